"""Launching: the printed accelerate line, real 2-process DDP over gloo, and refusing the wrong engine."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train
from safetensors.torch import load_file

SHORT = [
    "training.max_steps=4",
    "training.report_to=[]",
    "method.lora_dropout=0.0",
    "training.logging_steps=1",
]


def launch(*overrides: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_prints_the_accelerate_line(tmp_path):
    result = launch(
        "launch=ddp", "launch.num_processes=4", "launch.num_machines=2", "method=qlora", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    config_file = REPO / "launch" / "accelerate" / "ddp.yaml"
    assert line.startswith(
        f"accelerate launch --config_file {config_file} --num_processes 8 --num_machines 2 -m train "
        "launch=ddp launch.num_processes=4 launch.num_machines=2 method=qlora hydra.run.dir="
    )


def test_a_launch_started_without_its_processes_is_refused(tmp_path):
    result = run_train("launch=ddp", "launch.num_processes=2", *SHORT, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "launch=ddp: 1 process(es), engine NO" in result.stderr
    assert "asks for 2 process(es) with MULTI_GPU or MULTI_CPU" in result.stderr


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def launched(tmp_path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    run_dir = tmp_path / name
    result = launch(
        f"launch={name}", "launch.num_processes=2", "launch.run=true", f"hydra.run.dir={run_dir}",
        "training.per_device_train_batch_size=1", *SHORT, *overrides, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result.stdout + result.stderr  # Hydra logs to stdout


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launched(tmp_path_factory.mktemp("launch"), "ddp")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_twice_the_batch(ddp_run, tmp_path):
    ddp_dir, log = ddp_run
    assert "launch=ddp: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel" in log
    single = run_train(
        f"hydra.run.dir={tmp_path / 'single'}", "training.per_device_train_batch_size=2", *SHORT, cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-4000:]
    assert "launch=local: 1 process(es), engine NO, backend none" in single.stdout + single.stderr
    ddp_weights = load_file(ddp_dir / "adapter" / "adapter_model.safetensors")
    single_weights = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    moved = 0
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=2e-5, rtol=1e-4)
        moved += "lora_B" in name and tensor.abs().sum() > 0
    assert moved  # the adapters trained: equal because they learned the same, not because neither moved


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_trains_like_ddp(ddp_run, tmp_path, stage):
    """DeepSpeed runs on CPU here (gloo, its own CPU accelerator); the first use JIT-builds its comm op."""
    run_dir, log = launched(tmp_path, stage)
    assert f"launch={stage}: 2 process(es), engine DEEPSPEED, backend gloo, model DeepSpeedEngine" in log
    expected = losses(ddp_run[0])
    assert list(losses(run_dir)) == list(expected) == [1, 2, 3, 4]
    for step, loss in losses(run_dir).items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_checkpoint_resumes_where_it_stopped(tmp_path):
    """Sharded ZeRO-3 checkpoints: resuming from step 4 of 6 reproduces steps 5 and 6 exactly."""
    resume = ["training.max_steps=6", "training.save_steps=2"]
    run_dir, _ = launched(tmp_path, "zero3", *resume)
    uninterrupted = losses(run_dir)
    # as if the job died while writing step 6's checkpoint: every rank's part is there but the marker
    (run_dir / "checkpoints" / "checkpoint-6" / "COMPLETE").unlink()
    _, log = launched(tmp_path, "zero3", *resume, "training.resume_from_checkpoint=latest")
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-4'}\n" in log  # not from the unfinished 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    assert [step for step, _ in resumed] == [1, 2, 3, 4, 5, 6]  # one log, steps 5 and 6 from the resumed run
    for step, loss in resumed:
        assert loss == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.slow
def test_multirun_sweep_writes_each_point_and_a_summary(tmp_path):
    grid = ["-m", "method=lora,full", "training.max_steps=2", "training.report_to=[]"]
    result = run_train(*grid, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "0" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "1" / "model" / "model.safetensors").is_file()
    with (tmp_path / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["overrides"].split()[0] for row in rows] == ["method=lora", "method=full"]
    for point, row in enumerate(rows):
        assert row["run_dir"] == str(tmp_path / str(point)) and row["status"] == "finished"
        assert float(row["final_loss"]) > 0 and float(row["tokens_per_second"]) > 0
        assert float(row["peak_memory_gb"]) > 0.1
