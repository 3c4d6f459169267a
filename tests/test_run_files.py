"""Run files under a multi-process launch: global rank 0 writes .hydra/, train.log, config.yaml and
metrics.jsonl; rank k logs to train.rank<k>.log; the data is prepared once per node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import register_configs

HYDRA_LOGGING = Path(hydra.__file__).parent / "conf" / "hydra" / "job_logging" / "default.yaml"


def hydra_settings(monkeypatch, rank: str | None):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra.runtime.output_dir=/run"], return_hydra_config=True)
    return cfg.hydra.output_subdir, OmegaConf.to_container(cfg.hydra.job_logging, resolve=True)


@pytest.mark.parametrize(
    ("rank", "subdir", "log_file"),
    [
        (None, ".hydra", "/run/train.log"),  # a single process: no launcher, no RANK
        ("0", ".hydra", "/run/train.log"),
        ("3", None, "/run/train.rank3.log"),
    ],
)
def test_only_global_rank_zero_writes_hydra_files_and_train_log(monkeypatch, rank, subdir, log_file):
    output_subdir, logging = hydra_settings(monkeypatch, rank)
    assert output_subdir == subdir  # None: Hydra writes no .hydra/ (hydra/core/utils.py run_job)
    assert logging["handlers"]["file"].pop("filename") == log_file
    default = OmegaConf.to_container(OmegaConf.load(HYDRA_LOGGING))
    del default["handlers"]["file"]["filename"]
    assert logging == default  # the rest is Hydra's own job logging


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A real 2-process DDP launch on CPU, with an empty data cache."""
    tmp_path = tmp_path_factory.mktemp("run_files")
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "launch", "launch=ddp", "launch.num_processes=2", "launch.run=true",
         f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", "training.max_steps=4",
         "training.per_device_train_batch_size=1", "training.logging_steps=1", "training.report_to=[]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, cache, result.stdout + result.stderr


@pytest.mark.slow
def test_rank_zero_writes_the_run_files_and_each_rank_its_own_log(two_process_run):
    run_dir, _, output = two_process_run
    ddp = "launch=ddp: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel"
    assert ddp in output
    assert sorted(path.name for path in (run_dir / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml",
    ]  # fmt: skip
    assert [path.relative_to(run_dir) for path in run_dir.rglob(".hydra")] == [Path(".hydra")]
    assert sorted(path.name for path in run_dir.glob("*.log")) == ["train.log", "train.rank1.log"]
    rank_zero, rank_one = (run_dir / "train.log").read_text(), (run_dir / "train.rank1.log").read_text()
    assert "placement: rank 0/2" in rank_zero and "run directory" in rank_zero
    assert "placement:" not in rank_one and "run directory" not in rank_one and "data: " in rank_one
    assert (run_dir / "config.yaml").is_file() and (run_dir / "loss.png").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]  # one writer: each step once
    assert [row["step"] for row in rows if "eval_loss" in row] == [4]  # the held-out loss, under DDP
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [4, 4]  # generated across both ranks, written once
    assert sum("train_loss" in row for row in rows) == sum("peak_memory_gb" in row for row in rows) == 1


@pytest.mark.slow
def test_a_cold_cache_is_filled_once_and_read_by_the_other_rank(two_process_run):
    run_dir, cache, _ = two_process_run
    rank_zero, rank_one = (run_dir / "train.log").read_text(), (run_dir / "train.rank1.log").read_text()
    (entry,) = [path for path in cache.iterdir() if path.name != "source-hashes"]
    assert rank_zero.count("not in the cache yet") == 1 and "hashing" in rank_zero
    assert "not in the cache yet" not in rank_one and "hashing" not in rank_one
    assert f"prepared data from the cache: {entry}" in rank_one and "source hash from cache" in rank_one


def test_each_run_in_a_process_measures_its_own_peak_memory():
    """A local sweep runs its points one after another in one process (Hydra's basic launcher): each starts
    with reset_peak_memory, so a small point after a big one reports its own peak, not the big one's."""
    import numpy as np

    from train.run.outputs import peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    before = peak_memory_bytes()
    big = np.ones(512 * 2**20 // 8)  # 512 MiB, written: resident
    during = peak_memory_bytes()
    del big
    reset_peak_memory()
    after = peak_memory_bytes()
    assert during > before + 400 * 2**20, (before, during)
    assert after < during - 400 * 2**20, (during, after)  # the big point's peak is not this one's
