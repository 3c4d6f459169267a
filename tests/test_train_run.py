"""The default run, end to end as a user runs it: `python -m train` with no arguments."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_train
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default-run")
    result = run_train(cwd=cwd, evaluate=True)  # exactly the README's command
    assert result.returncode == 0, result.stderr[-4000:]
    runs = sorted((cwd / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0], result


def test_run_directory_is_outputs_date_time(default_run):
    run_dir, _ = default_run
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name)
    assert re.fullmatch(r"\d{2}-\d{2}-\d{2}", run_dir.name)
    assert (run_dir / "train.log").is_file()


def test_resolved_config_is_written(default_run):
    run_dir, _ = default_run
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text  # fully resolved
    config = OmegaConf.load(run_dir / "config.yaml")
    assert (config.model.name, config.method.name, config.data.name) == ("tiny", "lora", "sample")
    assert config.output_dir == str(run_dir)


def test_metrics_show_the_loss_going_down(default_run):
    run_dir, result = default_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    config = OmegaConf.load(run_dir / "config.yaml")
    assert [step for step, _ in losses] == list(
        range(config.training.logging_steps, config.training.max_steps + 1, config.training.logging_steps)
    )
    # single logged losses are noisy (batch 2 over 8 languages): compare the start with the end
    start = sum(loss for _, loss in losses[:2]) / 2
    end = sum(loss for _, loss in losses[-5:]) / 5
    assert end < start - 0.3, losses
    assert "train_runtime" in rows[-2] and rows[-1]["peak_memory_gb"] > 0.1  # the run's summary rows
    assert re.search(r"\d+/\d+ \[", result.stderr), "no progress bar on stderr"


def test_the_default_run_evaluates_on_held_out_conversations(default_run):
    """data.eval_split=0.05 of the sample: 6 of its 126 conversations, never trained on, scored at
    training.eval_steps=20 and at the end (step 40)."""
    run_dir, result = default_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
    assert list(evaluated) == [20, 40] and all(loss > 0 for loss in evaluated.values())
    assert "held out for evaluation: 6 of 126 rows, 6 of 126 groups (data.eval_split=0.05, seed 42)" in (
        result.stdout
    )
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [20, 20, 40, 40]  # samples.count=2 at each eval
    assert samples[0]["prompt"] == samples[2]["prompt"] and samples[0]["prompt"] != samples[1]["prompt"]
    assert samples[0]["prompt"].endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert all(isinstance(row["completion"], str) for row in samples)


def test_loss_plot_is_a_png(default_run):
    run_dir, _ = default_run
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_wandb_offline_run_is_written(default_run):
    run_dir, _ = default_run
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_adapter_is_safetensors_and_loads_back_with_peft(default_run, tokenizer):
    from peft import PeftModel

    from data import encode_chat, load_conversations
    from train.config import ModelConfig
    from train.model.build import build_model
    from train.run.run_dir import run_config

    run_dir, _ = default_run
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and sorted(adapter_config["target_modules"]) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    assert not (adapter / "adapter_model.bin").exists()

    config = run_config(run_dir)  # the typed config the run was trained with
    assert isinstance(config.model, ModelConfig)
    base = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)
    conversations = load_conversations(config.data.path, "messages").conversations[:12]

    def mean_loss(model) -> float:
        losses = []
        for conversation in conversations:
            encoded = encode_chat(conversation, tokenizer)
            ids = torch.tensor([encoded["input_ids"]])
            labels = ids.masked_fill(torch.tensor([encoded["assistant_masks"]]) == 0, -100)
            with torch.no_grad():
                losses.append(model(input_ids=ids, labels=labels).loss.item())
        return sum(losses) / len(losses)

    base_loss = mean_loss(base)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in tuned.named_parameters())
    # the adapter is what training learned: it fits the training data better than the base it was trained on
    assert mean_loss(tuned) < base_loss - 0.3
