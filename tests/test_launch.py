"""Launching: the printed accelerate line, real 2-process DDP over gloo, and refusing the wrong engine."""

from __future__ import annotations

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


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_twice_the_batch(tmp_path):
    ddp = launch(
        "launch=ddp", "launch.num_processes=2", "launch.run=true", f"hydra.run.dir={tmp_path / 'ddp'}",
        "training.per_device_train_batch_size=1", *SHORT, cwd=tmp_path,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    report = "launch=ddp: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel"
    assert report in ddp.stdout + ddp.stderr  # the run's log (Hydra logs to stdout)
    single = run_train(
        f"hydra.run.dir={tmp_path / 'single'}", "training.per_device_train_batch_size=2", *SHORT, cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-4000:]
    assert "launch=local: 1 process(es), engine NO, backend none" in single.stdout + single.stderr
    ddp_weights = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single_weights = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    moved = 0
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=2e-5, rtol=1e-4)
        moved += "lora_B" in name and tensor.abs().sum() > 0
    assert moved  # the adapters trained: equal because they learned the same, not because neither moved
