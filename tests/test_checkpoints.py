"""Which checkpoint a run resumes from, the metrics log a resumed run leaves, and stop requests (SIGTERM,
USR1, the stop file) that checkpoint and stop: in one process here, with real processes in test_launch.py."""

from __future__ import annotations

import json
import os
import signal
import zlib

from train.run.checkpoints import resume_point, rotate
from train.run.outputs import MetricsJsonl, read_metrics
from train.run.run_dir import (
    COMPLETE_MARKER,
    DAMAGED_SUFFIX,
    STOP_FILE,
    STOPPED_FILE,
    checkpoint_files,
    file_record,
    manifest_text,
    read_manifest,
)


def make_checkpoint(checkpoints, step: int, complete: bool):
    path = checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "optimizer.pt").write_bytes(bytes(range(256)) * 8)
    if complete:
        records = {name: file_record(path / name, checksum=True) for name in checkpoint_files(path)}
        (path / COMPLETE_MARKER).write_text(manifest_text(step, records))
    return path


def test_a_run_resumes_from_its_newest_complete_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert resume_point(checkpoints, OneProcess()) is None  # a fresh run
    make_checkpoint(checkpoints, 4, complete=True)
    expected = make_checkpoint(checkpoints, 10, complete=True)  # numerically newest, not by name (10 < 8)
    make_checkpoint(checkpoints, 8, complete=True)
    make_checkpoint(checkpoints, 12, complete=False)  # the job died while writing it
    (checkpoints / "checkpoint-notastep").mkdir()
    assert resume_point(checkpoints, OneProcess()) == expected
    legacy = checkpoints / "checkpoint-14"  # marked before markers listed their files: trusted as it is
    legacy.mkdir()
    (legacy / COMPLETE_MARKER).write_text("14\n")
    assert resume_point(checkpoints, OneProcess()) == legacy


def test_a_checkpoint_damaged_after_it_was_marked_complete_is_set_aside(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    older = make_checkpoint(checkpoints, 2, complete=True)
    newer = make_checkpoint(checkpoints, 4, complete=True)
    flipped = bytearray((newer / "optimizer.pt").read_bytes())
    flipped[100] ^= 0xFF  # same size, one byte differs: only the CRC-32 sees it
    (newer / "optimizer.pt").write_bytes(bytes(flipped))
    assert resume_point(checkpoints, OneProcess()) == older
    assert (
        f"not resuming from {newer}, changed since it was marked complete: optimizer.pt has CRC-32"
        in caplog.text
    )
    assert f"when written); moved to checkpoint-4{DAMAGED_SUFFIX}, trying the one before" in caplog.text
    assert (checkpoints / f"checkpoint-4{DAMAGED_SUFFIX}").is_dir() and not newer.exists()

    with (older / "trainer_state.json").open("a") as file:  # torn: another size
        file.write("}")
    (older / "optimizer.pt").unlink()
    assert resume_point(checkpoints, OneProcess()) is None
    assert (
        "complete: optimizer.pt is missing; trainer_state.json has 19 bytes (18 when written)" in caplog.text
    )


def test_rotation_keeps_the_newest_complete_checkpoints_and_the_best(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        make_checkpoint(checkpoints, step, complete=True)
    make_checkpoint(checkpoints, 3, complete=False)  # an older unfinished save
    make_checkpoint(checkpoints, 8, complete=False)  # being written now: never touched
    rotate(checkpoints, keep=1, best=str(checkpoints / "checkpoint-2"))
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "checkpoint-2",
        "checkpoint-6",
        "checkpoint-8",
    ]
    rotate(checkpoints, keep=None, best=None)  # no limit: every complete one stays
    assert (checkpoints / "checkpoint-2").is_dir()


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


class OneProcess:
    """What CompleteCheckpoints asks of accelerate's Accelerator, for one process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


def callback(run_dir):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from train.run.checkpoints import CompleteCheckpoints

    args = SimpleNamespace(output_dir=str(run_dir / "checkpoints"))
    state = TrainerState(global_step=3, max_steps=10)
    trainer = SimpleNamespace(accelerator=OneProcess())
    return CompleteCheckpoints(trainer, run_dir), args, state, TrainerControl()


def save(checkpoints, run_dir, args, state, control):
    """What Trainer does on should_save: write checkpoint-<step>, then call on_save."""
    path = run_dir / "checkpoints" / f"checkpoint-{state.global_step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return checkpoints.on_save(args, state, control)


def test_sigterm_while_training_checkpoints_at_the_next_step_then_stops(tmp_path):
    checkpoints, args, state, control = callback(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    checkpoints.on_train_begin(args, state, control)
    checkpoints.on_step_end(args, state, control)
    assert not control.should_save and not control.should_training_stop  # no request yet
    os.kill(os.getpid(), signal.SIGTERM)  # what Slurm's preemption, scancel and torchrun send
    checkpoints.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop
    control = save(checkpoints, tmp_path, args, state, control)
    recorded = read_manifest(tmp_path / "checkpoints" / "checkpoint-3")
    assert recorded == {"trainer_state.json": [2, f"{zlib.crc32(b'{}'):08x}"]}  # every file: size, CRC-32
    assert (tmp_path / STOPPED_FILE).read_text() == "3 SIGTERM\n"  # the job script requeues on it
    checkpoints.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGTERM) is before  # after training, SIGTERM is the process's own again


def test_a_request_during_a_periodic_save_stops_after_it_without_a_second_save(tmp_path):
    checkpoints, args, state, control = callback(tmp_path)
    checkpoints.on_train_begin(args, state, control)
    checkpoints.on_step_end(args, state, control)
    (tmp_path / STOP_FILE).touch()  # USR1's trap in the job script, while checkpoint-3 is written
    control = save(checkpoints, tmp_path, args, state, control)
    assert control.should_training_stop  # stop now: checkpoint-3 is complete, step 4 would save again
    assert (tmp_path / STOPPED_FILE).read_text() == f"3 {STOP_FILE}\n"
    assert not (tmp_path / STOP_FILE).exists()  # honoured: the resumed run must not stop at once
    checkpoints.on_train_end(args, state, control)
    checkpoints.on_train_begin(args, state, control)  # the resumed run
    assert not (tmp_path / STOPPED_FILE).exists()


def test_a_restarted_run_without_a_checkpoint_starts_its_log_afresh(tmp_path):
    from transformers import TrainerControl, TrainerState

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # died before its first checkpoint
    MetricsJsonl(path).on_train_begin(None, TrainerState(global_step=0), TrainerControl())
    assert read_metrics(path) == []
