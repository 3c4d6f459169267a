"""samples.jsonl: its prompts in the exact Llama 3.1 format, and generations in which every rank takes part
under FSDP and ZeRO-3, whatever the number of prompts, as one process would generate them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_launch import launched

from data import encode_chat
from launch.__main__ import free_port
from train.run.samples import prompt_text, sample_prompts, user_prompt_text

CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Wann sage ich „in den Park“?"},
    {"role": "assistant", "content": "Bei einer Bewegung: Ich gehe in den Park."},
    {"role": "user", "content": "Und „im Park“?"},
    {"role": "assistant", "content": "Beim Ort: Ich bin im Park."},
]


def test_a_held_out_chat_becomes_its_opening_turns_token_for_token(tokenizer):
    """TRL tokenizes the prompt text with the tokenizer (which adds <|begin_of_text|>): the ids are the
    chat's own up to its first assistant header, as data.encode_chat wrote them for training."""
    ids = encode_chat(CHAT, tokenizer)["input_ids"]
    text = prompt_text(ids, tokenizer)
    assert text.endswith("in den Park“?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    opening = encode_chat([*CHAT[:2], {"role": "assistant", "content": ""}], tokenizer)["input_ids"][:-1]
    assert tokenizer(text)["input_ids"] == opening == ids[: len(opening)]


def test_configured_prompts_are_one_turn_chats_and_held_out_ones_come_first(tokenizer):
    text = user_prompt_text("Explain LoRA in one sentence.", tokenizer)
    expected = encode_chat(
        [{"role": "user", "content": "Explain LoRA in one sentence."}, {"role": "assistant", "content": ""}],
        tokenizer,
    )["input_ids"][:-1]  # the reply's header, not its end
    assert tokenizer(text)["input_ids"] == expected

    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [encode_chat(CHAT, tokenizer)["input_ids"]] * 3})
    held_out = sample_prompts(SimpleNamespace(prompts=[], count=2, max_new_tokens=8), rows, tokenizer)
    assert held_out == [prompt_text(rows[0]["input_ids"], tokenizer)] * 2
    given = SimpleNamespace(prompts=["Hi"], count=2, max_new_tokens=8)
    assert sample_prompts(given, rows, tokenizer) == [user_prompt_text("Hi", tokenizer)]


# Two evaluations (steps 1 and 2), with short replies: samples at each
TWO_EVALS = (
    "training.max_steps=2",
    "training.eval_steps=1",
    "samples.max_new_tokens=8",
    "training.max_length=128",
)

# sitecustomize.py for the launched ranks: at each generate() call, a line "<held> <whole>" in
# $GENERATION_PROBE.rank<RANK>: the parameter elements this rank holds as generation starts, and the model's
# (ZeRO-3 leaves a partitioned parameter's .data empty; ds_numel is its whole size). Installed once
# transformers' generation module is imported (an audit hook sees every import), so it loads nothing early.
GENERATION_PROBE = """
import os, sys

def measure_generate(event, args):
    utils = sys.modules.get("transformers.generation.utils")
    if event != "import" or not hasattr(utils, "GenerationMixin") or hasattr(utils, "probed"):
        return
    utils.probed, generate = True, utils.GenerationMixin.generate

    def probed(self, *args, **kwargs):
        held = sum(p.data.numel() for p in self.parameters())
        whole = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        with open(f"{os.environ['GENERATION_PROBE']}.rank{os.environ['RANK']}", "a") as file:
            file.write(f"{held} {whole}\\n")
        return generate(self, *args, **kwargs)

    utils.GenerationMixin.generate = probed

if "RANK" in os.environ and "GENERATION_PROBE" in os.environ:
    sys.addaudithook(measure_generate)
"""


@pytest.fixture
def generate_calls(tmp_path, monkeypatch):
    """Processes launched from this test record their generate() calls (GENERATION_PROBE); returns, for a
    rank, its calls' (held, whole) parameter elements."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GENERATION_PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GENERATION_PROBE", str(tmp_path / "generate"))

    def calls(rank: int) -> list[tuple[int, int]]:
        lines = (tmp_path / f"generate.rank{rank}").read_text().splitlines()
        return [(int(held), int(whole)) for held, whole in (line.split() for line in lines)]

    return calls


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def one_process_completions(run_dir: Path, prompts: list[str], tokenizer) -> list[str]:
    """What one process, with the whole model, says to ``prompts`` with the run's final weights (its base
    rebuilt from the seed, its adapter/ on top): greedy, to the end of a turn, one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import GenerationConfig

    from data.tokenizer import stop_token_ids
    from train.model.build import build_model
    from train.run.run_dir import run_config

    config = run_config(run_dir)
    base = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=config.samples.max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    replies = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        reply = model.generate(input_ids=ids, generation_config=greedy)[0, ids.shape[1] :]
        replies.append(tokenizer.decode(reply, skip_special_tokens=True))
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_one_prompt_on_two_ranks_is_completed_once_per_eval(name, generate_calls, tmp_path, tokenizer):
    """TRL gave the one prompt to rank 0 and nothing to rank 1, which went to gather the results while rank 0
    all-gathered parameters: FSDP aborted at the first eval (gloo: "collective mismatch"), ZeRO-3 hung. Now
    rank 1 generates the prompt too and drops its copy; under ZeRO-3 no rank gathers the whole model first
    (TRL's default held all 33.3M elements of the tiny model as generation began)."""
    run_dir, _ = launched(tmp_path, name, *TWO_EVALS, "data.eval_split=1", "samples.count=1")
    rows = samples(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    prompt = rows[0]["prompt"]
    assert prompt == rows[1]["prompt"] and prompt.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert rows[1]["completion"] == one_process_completions(run_dir, [prompt], tokenizer)[0]
    for rank in (0, 1):
        calls = generate_calls(rank)
        assert len(calls) == 2  # one generate() per eval on each rank
        if name == "zero3":  # the tiny model's embeddings and LM head (2 x 16.4M) stay partitioned
            assert all(held < whole / 10 for held, whole in calls), calls


@pytest.mark.slow
def test_more_prompts_than_ranks_are_each_completed_once_per_eval_as_one_process_would(
    generate_calls, tmp_path, tokenizer
):
    """3 prompts on 2 ranks: rank 0 takes two, rank 1 the third and the third again (dropped), so both call
    generate() twice an eval; the rows come back in the prompts' order, each reply what one process says."""
    run_dir, _ = launched(tmp_path, "fsdp", *TWO_EVALS, "data.eval_split=3", "samples.count=3")
    rows = samples(run_dir)
    assert [row["step"] for row in rows] == [1, 1, 1, 2, 2, 2]
    prompts = [row["prompt"] for row in rows[3:]]
    assert [row["prompt"] for row in rows[:3]] == prompts and len(set(prompts)) == 3
    assert [row["completion"] for row in rows[3:]] == one_process_completions(run_dir, prompts, tokenizer)
    assert len(generate_calls(0)) == len(generate_calls(1)) == 4


@pytest.mark.slow
def test_ranks_whose_replies_end_at_different_steps_generate_in_step_under_fsdp(tmp_path):
    """Rank 0's reply stops at its 2nd token, rank 1's runs on: with synced_gpus rank 0 keeps stepping
    (without it, measured: gloo aborts with "collective mismatch"); the sharded replies are the whole
    model's in one process."""
    out = tmp_path / "replies.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), __file__, str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    replies = json.loads(out.read_text())
    assert [len(ids) for ids in replies["one_process"]] == [2, 8]  # rank 0 stopped early, rank 1 did not
    assert replies["sharded"] == replies["one_process_text"]


def generate_sharded(out: Path) -> None:
    """Under torchrun (2 CPU processes): the tiny model sharded as accelerate's FSDP2 shards it (each decoder
    layer, then the root; generate registered as transformers' Trainer registers it, trainer.py:1816), two
    prompts, one a rank, with a stop token that ends the first reply after 2 tokens only; ``out``: each
    prompt's reply ids from the whole model in one process, their text, and the sharded replies."""
    import torch
    from accelerate import PartialState
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers import GenerationConfig

    from data import load_tokenizer
    from data.tokenizer import stop_token_ids
    from train.config import compose_config, load_config
    from train.model.build import build_model
    from train.run.samples import complete_on_every_rank

    state = PartialState(cpu=True)  # gloo: accelerate takes a CPU world for a single process unless told
    tokenizer = load_tokenizer()
    model = build_model(load_config(compose_config([])).model, tokenizer, dtype=torch.float32, seed=0).eval()
    prompts = [user_prompt_text(text, tokenizer) for text in ("Hello.", "Explain LoRA in one sentence.")]

    def greedy(*stop: int) -> GenerationConfig:
        return GenerationConfig(
            do_sample=False, max_new_tokens=8, eos_token_id=[*stop_token_ids(tokenizer), *stop],
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    def reply(prompt: str, *stop: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        return model.generate(input_ids=ids, generation_config=greedy(*stop))[0, ids.shape[1] :].tolist()

    unstopped = [reply(prompt) for prompt in prompts]
    stop = unstopped[0][1]  # the first reply's 2nd token, which the second reply never says
    assert stop not in unstopped[0][:1] + unstopped[1], unstopped
    one_process = [reply(prompt, stop) for prompt in prompts]
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")
    sharded = complete_on_every_rank(model, prompts, tokenizer, greedy(stop), batch_size=1, synced_gpus=True)
    if state.is_main_process:
        text = [tokenizer.decode(ids, skip_special_tokens=True) for ids in one_process]
        out.write_text(json.dumps({"one_process": one_process, "one_process_text": text, "sharded": sharded}))


if __name__ == "__main__":  # test_ranks_whose_replies_end_at_different_steps_generate_in_step_under_fsdp
    generate_sharded(Path(sys.argv[1]))
