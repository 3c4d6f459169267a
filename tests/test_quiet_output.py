"""A command's output is what the user needs to read: no library notes they cannot act on (train/__init__.py,
data/__init__.py, train/run/trainer.py's ``training_args``). ``python -m data.prepare``'s: test_prepare.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NOISE = (
    r"Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes, at import
    r"found in sys\.modules after import of package",  # runpy, python -m data.prepare
    r"Setting accelerator to CPU",  # DeepSpeed, imported by accelerate on every run
    r"gradient_checkpointing\w*` is deprecated",  # transformers 5: renamed argument and model methods
)


def run(module: str, *overrides: str, cwd) -> str:
    """``python -m <module> <overrides>`` with the user's environment, less a DS_ACCELERATOR this session set;
    stdout and stderr together."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def assert_quiet(output: str) -> None:
    heard = [noise for noise in NOISE if re.search(noise, output)]
    assert not heard, f"{heard} in:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


def test_run_logs_only_its_own_lines(cache_dir, tmp_path):
    # gradient checkpointing on, as for 8B and up: the path where peft and TRL call the renamed model methods
    output = run(
        "train",
        "training.max_steps=2",
        "training.report_to=[]",
        "model.gradient_checkpointing=true",
        f"data.cache_dir={cache_dir}",
        "data.num_proc=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_quiet(output)
    assert "launch=local: 1 process(es), engine NO" in output
    assert "126 conversations" in output and f"done: {tmp_path / 'run'}" in output
