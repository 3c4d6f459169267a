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
def tokenizer32():
    """The same tokenizer with Llama 3.2's Instruct template (model=1b, 3b)."""
    from data import load_tokenizer

    return load_tokenizer(chat_format="llama3.2")


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    from data.tokenizer import meta_tokenizer_model

    return Tokenizer(meta_tokenizer_model())


def meta_base_checkpoint(directory: Path, tokenizer, model=None) -> Path:
    """``directory`` as Meta's base release (Llama-3.1-8B) ships it: a tokenizer whose EOS is
    ``<|end_of_text|>``, with no pad token and no chat template; with ``model``, its weights, a config.json
    and a generation_config.json that stop at ``<|end_of_text|>`` (128001) only."""
    import json

    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config["eos_token"] = "<|end_of_text|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if model is not None:
        model.config.eos_token_id, model.config.pad_token_id = 128001, None
        model.save_pretrained(directory)
        base_generation = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": 128001,
                           "temperature": 0.6, "top_p": 0.9}  # fmt: skip
        (directory / "generation_config.json").write_text(json.dumps(base_generation, indent=2))
    return directory


# Tests about something else than evaluation skip the held-out eval (2-3 s a run here: 128,256-wide logits)
NO_EVAL = "data.eval_split=0"


def run_train(
    *overrides: str, cwd: Path, timeout: float = 600, evaluate: bool = False
) -> subprocess.CompletedProcess:
    """``python -m train <overrides>`` as a user runs it, from ``cwd``; without the held-out evaluation of
    the default data unless ``evaluate``."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "train", *([] if evaluate else [NO_EVAL]), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bench_dry_run(script: str, *arguments: str, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``python bench/<script> <arguments> --out <out>`` as its CPU dry run (CUDA hidden, so on a GPU machine
    too): it must exit 0 and say so; the process and the JSON report it wrote."""
    import json

    result = subprocess.run(
        [sys.executable, f"bench/{script}", *arguments, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "CPU DRY RUN" in result.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    return result, report


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
