"""``python -m train.evaluate``: lm-eval scores a run's adapted model on the shipped local task exactly as the
model scores the replies in its training format, writes the results into the run, and refuses bad input
before any weight loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_chat_cli import lora_run  # noqa: F401  (the tiny LoRA run directory, a fixture)
from test_config import composed

from data import encode_chat
from train.config import ConfigError, load_config
from train.eval_tasks.oasst_reply_choice import OUTPUT, build_items, jsonl
from train.evaluate import TASKS_DIR, harness_model, main, task_manager, task_specs
from train.run.outputs import save_resolved_config

TASK = "oasst_reply_choice"
LIMIT = 3


def reply_loglikelihood(model, tokenizer, prompt: str, reply: str) -> float:
    """Plain transformers: log P(reply | prompt) in the exact Llama 3.1 format the run trains on
    (``encode_chat``; its assistant mask marks the reply), summed over the reply's tokens and, as lm-eval
    does, the ``\\n\\n`` closing the assistant header: lm-eval moves a context's trailing whitespace into
    what it scores. That token is the same for every choice, so it shifts each one's score alike."""
    dialog = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    encoded = encode_chat(dialog, tokenizer)
    ids = encoded["input_ids"][:-1]  # less the closing <|eot_id|>
    start = encoded["assistant_masks"].index(1) - 1
    assert tokenizer.decode(ids[start]) == "\n\n"
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    token_ll = log_probs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # [k]: log P(ids[k + 1])
    return float(token_ll[start - 1 :].sum())


def test_shipped_task_data_is_what_its_builder_writes():
    assert OUTPUT.read_text() == jsonl(build_items())
    items = build_items()
    assert len(items) == 24 and all(len(item["choices"]) == 4 for item in items)
    assert len({item["prompt"] for item in items}) == 24


@pytest.mark.slow
def test_scores_the_adapted_model_on_the_shipped_task(lora_run, tokenizer, tmp_path):  # noqa: F811
    """From a directory outside the repo (the task's data file resolves against its YAML) and with the Hub
    off: the accuracy and every log-likelihood are those of the adapted model on the replies as trained."""
    run_dir, tuned = lora_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    result = subprocess.run(
        [sys.executable, "-m", "train.evaluate", f"run={run_dir}", f"tasks={TASK}", f"limit={LIMIT}",
         "batch_size=5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "eval" / f"{TASK}-results.json").read_text())
    assert record["weights"] == str(run_dir / "adapter") and record["chat_template"] is True
    assert record["limit"] == LIMIT and record["n-samples"] == {"original": 24, "effective": LIMIT}
    assert record["versions"] == 1.0 and record["lm_eval_version"].startswith("0.4.")
    accuracy = record["results"]["acc,none"]
    assert 0 <= accuracy <= 1
    assert TASK in result.stdout and "acc_norm" in result.stdout

    items = build_items()[:LIMIT]
    expected = [[reply_loglikelihood(tuned, tokenizer, i["prompt"], c) for c in i["choices"]] for i in items]
    samples = (run_dir / "eval" / f"{TASK}-samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in samples]
    assert [sample["doc_id"] for sample in samples] == list(range(LIMIT))
    scored = [[ll for ll, _ in sample["filtered_resps"]] for sample in samples]
    assert scored == [pytest.approx(lls, rel=1e-5) for lls in expected]
    picks = [max(range(4), key=lls.__getitem__) for lls in expected]
    assert accuracy == sum(pick == item["gold"] for pick, item in zip(picks, items, strict=True)) / LIMIT
    per_char = [max(range(4), key=lambda c, i=i, lls=lls: lls[c] / len(i["choices"][c]))
                for lls, i in zip(expected, items, strict=True)]  # fmt: skip
    assert (
        record["results"]["acc_norm,none"]
        == sum(pick == item["gold"] for pick, item in zip(per_char, items, strict=True)) / LIMIT
    )
    with tuned.disable_adapter():  # the adapter is what was scored
        base = reply_loglikelihood(tuned, tokenizer, items[0]["prompt"], items[0]["choices"][0])
    assert base != pytest.approx(expected[0][0], rel=1e-5)


@pytest.fixture
def unloadable_run(tmp_path):
    """A run directory whose adapter cannot load (an empty adapter_config.json): an error from it would mean
    weights were being loaded."""
    cfg = composed("training.report_to=[]")
    cfg.output_dir = str(tmp_path)
    save_resolved_config(cfg, tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([f"tasks={TASK},hellaswag"], f"tasks=hellaswag: no such task in {TASKS_DIR}; tasks found there: "),
        (["tasks=hellaswag"], f"tasks found there: {TASK} (add a folder of your own with include=<dir>)"),
        ([f"tasks={TASK}", "limt=4"], "unknown argument(s) limt; valid: run, tasks, limit, weights,"),
        ([f"tasks={TASK}", "limit=0"], "limit=0: expected a whole number >= 1"),
        ([f"tasks={TASK}", "batch_size=auto"], "batch_size=auto: expected a whole number >= 1"),
        ([f"tasks={TASK}", "chat_template=yes"], "chat_template=yes: expected true or false"),
        ([f"tasks={TASK}", "include=/no/such/dir"], "include=/no/such/dir: no such directory"),
        ([f"tasks={TASK}", "weights=model"], "weights=model: a lora run leaves adapter/"),
        ([], "tasks= is missing: task names, comma-separated (shipped: oasst_reply_choice)"),
        (["tasks=,"], "tasks= is missing"),
    ],
)
def test_bad_input_fails_before_loading_weights(unloadable_run, capsys, arguments, message):
    assert main([f"run={unloadable_run}", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert "usage: python -m train.evaluate run=<run directory> tasks=<task>" in error


def test_include_folder_reads_data_relative_to_its_yaml(tmp_path):
    """A user's task folder: its relative ``data_files`` resolve against the YAML, whatever the cwd; a missing
    one fails naming the YAML."""
    (tmp_path / "data.jsonl").write_text('{"q": "1+1?", "choices": ["2", "3"], "gold": 0}\n')
    config = {"task": "mine", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": "data.jsonl"}},
              "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "q",
              "doc_to_choice": "choices", "doc_to_target": "gold"}  # fmt: skip
    (tmp_path / "mine.yaml").write_text(json.dumps(config))  # JSON is YAML
    manager = task_manager((tmp_path,))
    assert {TASK, "mine"} <= set(manager.all_tasks)
    [spec] = task_specs(manager, ("mine",))
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "data.jsonl")}
    (tmp_path / "data.jsonl").unlink()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'mine.yaml'}: data_files data.jsonl is not there"):
        task_specs(manager, ("mine",))


@pytest.mark.parametrize("chat_format", ["llama3.1", "llama3.2"])
def test_the_harness_prompts_in_the_format_the_run_trained(chat_format):
    """lm-eval renders prompts with the tokenizer's template; for Llama 3.2 that would carry today's date,
    not the one the training data carries. The prompt is encode_chat's, up to the assistant's reply."""
    from data import load_tokenizer
    from train.model.build import build_model

    tokenizer = load_tokenizer(chat_format=chat_format)
    model = build_model(load_config(composed()).model, tokenizer, dtype=torch.float32, seed=0)
    history = [{"role": "user", "content": "Which is larger, 7 or 9?"}]
    prompt = harness_model(model, tokenizer, batch_size=1).apply_chat_template(history)
    trained = encode_chat([*history, {"role": "assistant", "content": "9"}], tokenizer)["input_ids"]
    reply = tokenizer("9<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == trained[: -len(reply)]
    assert "Today Date: 26 Jul 2024" in prompt
