"""Shared fixtures: the real Llama 3.1 tokenizer and Meta's reference tokenizer, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "oasst_sample.jsonl"


@pytest.fixture(scope="session")
def tokenizer():
    from data import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    from data.tokenizer import meta_tokenizer_model

    return Tokenizer(meta_tokenizer_model())


def run_train(*overrides: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m train <overrides>`` as a user runs it, from ``cwd``."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "train", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def shared_launch(tmp_path_factory):
    """``test_launch.launched``, run once per session for each (launch, overrides): real 2-process runs cost
    about a minute each here, and several test files read different things from the same run."""
    from test_launch import launched

    runs = {}

    def run(name: str, *overrides: str):
        key = (name, *overrides)
        if key not in runs:
            runs[key] = launched(tmp_path_factory.mktemp("launch"), name, *overrides)
        return runs[key]

    return run
