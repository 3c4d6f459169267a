"""Which checkpoint a run resumes from, and the metrics log a resumed run leaves."""

from __future__ import annotations

import json

from train.checkpoints import COMPLETE_MARKER, latest_checkpoint
from train.outputs import MetricsJsonl, read_metrics


def make_checkpoint(checkpoints, step: int, complete: bool):
    path = checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints) is None  # a fresh run
    make_checkpoint(checkpoints, 4, complete=True)
    expected = make_checkpoint(checkpoints, 10, complete=True)  # numerically newest, not by name (10 < 8)
    make_checkpoint(checkpoints, 8, complete=True)
    make_checkpoint(checkpoints, 12, complete=False)  # the job died while writing it
    (checkpoints / "checkpoint-notastep").mkdir()
    assert latest_checkpoint(checkpoints) == expected
    assert f"skipping {checkpoints / 'checkpoint-12'}: it was not finished" in caplog.text


def test_a_resumed_log_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first_run = [
        {"step": 1, "loss": 3.0, "train_runtime": 1.0},
        {"step": 2, "loss": 2.5, "train_runtime": 2.0},
        {"step": 3, "loss": 2.4, "train_runtime": 3.0},  # after the checkpoint at step 2: done again
        {"step": 3, "train_loss": 2.6, "train_runtime": 3.0},  # the interrupted run's summary
        {"step": 3, "peak_memory_gb": 1.5},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in first_run))
    MetricsJsonl(path).keep_until(2)
    assert read_metrics(path) == first_run[:2]
