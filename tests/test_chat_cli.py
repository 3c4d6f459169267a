"""``python -m train.chat``: replies in the exact Llama 3.1 format from a run's weights, one-shot and in a
real terminal, and clear errors before any weight loads."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch
from conftest import REPO
from test_config import composed

from data.prompts import prompt_ids
from data.tokenizer import stop_token_ids
from train.chat import (
    USER_PROMPT,
    Sampling,
    choose_weights,
    generate_reply,
    load_chat_model,
    main,
)
from train.config import ConfigError, load_config
from train.run.outputs import save_resolved_config
from train.run.run_dir import run_config

SYSTEM = {"role": "system", "content": "You answer briefly."}
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """A tiny LoRA run directory as ``python -m train`` leaves it (config.yaml, adapter/), and the adapted
    model in memory, the reference the CLI is compared with. The adapter is peft's random init, not a
    trained one (the chat reads weights, whatever trained them): its B matrices are not zero, so it
    changes what the base says, and no trainer runs here."""
    from peft import get_peft_model

    from train.model.build import build_model, build_peft_config

    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = composed("training.report_to=[]")
    cfg.output_dir = str(run_dir)
    config = load_config(cfg)
    save_resolved_config(cfg, run_dir)
    base = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)
    adapter = build_peft_config(config.method)
    adapter.init_lora_weights = False
    tuned = get_peft_model(base, adapter).eval()
    tuned.save_pretrained(run_dir / "adapter")
    return run_dir, tuned


def template_prompt(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def greedy(model, tokenizer, ids: list[int]) -> str:
    """Plain transformers + peft: the greedy reply to prompt ``ids``, decoded."""
    output = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


def chat_command(run_dir, *arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train.chat",
        f"run={run_dir}",
        f"max_new_tokens={MAX_NEW_TOKENS}",
        *arguments,
    ]


def test_one_shot_prints_the_greedy_reply_of_the_adapted_model(lora_run, tokenizer):
    run_dir, tuned = lora_run
    messages = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    ids = template_prompt(tokenizer, messages)
    assert prompt_ids(messages, tokenizer) == ids  # the official template's add_generation_prompt=True
    assert ids[-4:] == tokenizer.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
    )
    expected = greedy(tuned, tokenizer, ids)
    with tuned.disable_adapter():
        assert greedy(tuned, tokenizer, ids) != expected  # the adapter is what speaks

    result = subprocess.run(
        chat_command(run_dir, "prompt=What is 2+2?", "system=You answer briefly."),
        cwd=REPO, capture_output=True, timeout=300,
    )  # fmt: skip
    # bytes, decoded here: text mode would turn the reply's own "\r\n" (a random model writes them) into "\n"
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected and result.stdout == expected + "\n"
    assert f"loaded {run_dir / 'adapter'} on cpu (torch.float32)" in result.stderr
    assert f"prompt: {len(ids)} tokens, 2 messages" in result.stderr


def read_until(fd: int, marker: bytes, transcript: bytearray, timeout: float = 120) -> None:
    """Read the terminal into ``transcript`` until ``marker`` follows everything read before the call."""
    start, deadline = len(transcript), time.monotonic() + timeout
    while marker not in transcript[start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} on the terminal; it shows {bytes(transcript)!r}")
        transcript += os.read(fd, 4096)


def test_terminal_session_keeps_the_conversation(lora_run, tokenizer, tmp_path):
    """Two turns, /reset, a third, /exit, through a real pseudo-terminal: each reply is the greedy reply to
    the whole conversation so far in the Llama 3.1 format, and /reset starts it again."""
    run_dir, tuned = lora_run
    first, second = {"role": "user", "content": "What is 2+2?"}, {"role": "user", "content": "And 3+3?"}
    reply_1 = greedy(tuned, tokenizer, template_prompt(tokenizer, [first]))
    history = [first, {"role": "assistant", "content": reply_1}, second]
    reply_2 = greedy(tuned, tokenizer, template_prompt(tokenizer, history))
    reply_3 = greedy(tuned, tokenizer, template_prompt(tokenizer, [second]))

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))  # no line wrapping
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as log:
        process = subprocess.Popen(
            chat_command(run_dir), cwd=REPO, stdin=terminal, stdout=terminal, stderr=log, close_fds=True
        )
    os.close(terminal)
    transcript = bytearray()
    try:
        read_until(controller, USER_PROMPT.encode(), transcript)
        for line in (first["content"], second["content"], "/reset", second["content"]):
            os.write(controller, line.encode() + b"\n")
            read_until(controller, USER_PROMPT.encode(), transcript)
        os.write(controller, b"/exit\n")
        assert process.wait(timeout=60) == 0, stderr.read_text()[-3000:]
    finally:
        process.kill()
        os.close(controller)

    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", transcript.decode()).replace("\r\n", "\n")
    prompt = USER_PROMPT
    assert screen == (
        f"{prompt}What is 2+2?\n{reply_1}\n{prompt}And 3+3?\n{reply_2}\n"
        f"{prompt}/reset\n(conversation cleared)\n{prompt}And 3+3?\n{reply_3}\n{prompt}"
    )
    logged = stderr.read_text()
    assert "/reset clears the conversation, /exit or Ctrl-D quits" in logged
    counts = [len(template_prompt(tokenizer, m)) for m in ([first], history, [second])]
    turns = re.findall(r"prompt: (\d+) tokens, (\d+) messages", logged)
    assert turns == [(str(counts[0]), "1"), (str(counts[1]), "3"), (str(counts[2]), "1")]


def test_a_run_without_weights_says_what_it_has_and_how_to_resume(lora_run, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((lora_run[0] / "config.yaml").read_text())
    (tmp_path / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-20" / "COMPLETE").write_text("{}")
    assert main([f"run={tmp_path}", "prompt=hi"]) == 2
    error = capsys.readouterr().err
    assert f"error: {tmp_path}: no finished weights: no adapter/ and no merged/" in error
    assert "(it has 1 complete checkpoint(s))" in error and "The run may still be training" in error
    assert f"hydra.run.dir={tmp_path} training.resume_from_checkpoint=latest" in error
    assert "usage: python -m train.chat run=<run directory>" in error
    assert main([f"run={tmp_path / 'missing'}"]) == 2
    assert f"{tmp_path}/missing/config.yaml: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["prompt=hi", "temprature=0.7"],
            "unknown argument(s) temprature; valid: run, prompt, system, weights,",
        ),
        (["weights=merged"], "merged: no merged checkpoint; write it with `python -m train.export run="),
        (
            ["weights=model"],
            "weights=model: a lora run leaves adapter/ (and merged/ once exported), never model/",
        ),
        (["weights=lora"], "weights=lora: expected one of auto, adapter, merged, model"),
        (["max_new_tokens=0"], "need max_new_tokens >= 1"),
    ],
)
def test_bad_arguments_fail_before_loading(lora_run, capsys, arguments, message):
    assert main([f"run={lora_run[0]}", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_adapter_first_merged_on_request_full_runs_chat_from_model(lora_run, tokenizer, tmp_path):
    """``auto`` takes the adapter even where an export exists; ``weights=merged`` loads the export, which
    replies as the adapter does; a full run's weights are its ``model/``."""
    from train.export import export

    tuned = lora_run[1]
    run_dir = tmp_path / "lora"  # a copy: the export would change what the other tests see
    shutil.copytree(lora_run[0], run_dir)
    merged = export(run_dir)
    assert choose_weights(run_dir, run_config(run_dir), "auto") == run_dir / "adapter"
    assert choose_weights(run_dir, run_config(run_dir), "merged") == merged
    model, _ = load_chat_model(run_dir, merged)
    assert not hasattr(model, "peft_config") and model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert generate_reply(model, tokenizer, messages, Sampling(MAX_NEW_TOKENS, 0.0, 1.0)) == greedy(
        tuned, tokenizer, template_prompt(tokenizer, messages)
    )

    cfg = composed("method=full", "training.report_to=[]")
    full_run = tmp_path / "full"
    cfg.output_dir = str(full_run)
    (full_run / "model").mkdir(parents=True)
    save_resolved_config(cfg, full_run)
    (full_run / "model" / "config.json").write_text("{}")
    assert choose_weights(full_run, run_config(full_run), "auto") == full_run / "model"
    with pytest.raises(ConfigError, match="a full run leaves model/"):
        choose_weights(full_run, run_config(full_run), "adapter")
