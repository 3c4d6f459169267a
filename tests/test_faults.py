"""Faults a long run meets, injected into real ``python -m train`` processes: SIGKILL in the middle of a
checkpoint, a file of a complete checkpoint damaged afterwards, a disk that fills up. (SIGTERM, USR1 and
a node's processes killed mid-job are in test_launch.py and test_slurm_launch.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NO_EVAL, run_train

KILL_DURING_SAVE = Path(__file__).parent / "faults" / "kill_during_save.py"
RUN = [
    "training.max_steps=8", "training.save_steps=2", "training.save_total_limit=2",
    "training.logging_steps=1", "training.report_to=[]", "training.resume_from_checkpoint=latest",
    "training.per_device_train_batch_size=1", "training.max_length=256",  # short steps: the saves matter here
    NO_EVAL,
]  # fmt: skip


def killed_while_saving(fault: str, run_dir: Path) -> str:
    """Run with ``tests/faults/kill_during_save.py``; it must die of its SIGKILL at ``fault``."""
    result = subprocess.run(
        [sys.executable, str(KILL_DURING_SAVE), fault, f"hydra.run.dir={run_dir}", *RUN],
        cwd=run_dir.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]
    return result.stdout + result.stderr


def checkpoints(run_dir: Path) -> dict[str, bool]:
    """Each checkpoint directory: whether it is marked complete."""
    return {
        path.name: (path / "COMPLETE").is_file()
        for path in sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    }


def last_error(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("error: ")][-1]


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.mark.slow
def test_a_save_killed_anywhere_resumes_from_the_checkpoint_before_it(tmp_path):
    """SIGKILL after the model files, in the middle of optimizer.pt, and after trainer_state.json (before
    the marker): each time the next run resumes from the complete checkpoint before it, which rotation
    (save_total_limit=2) never removed, and removes the unfinished one. Then a complete checkpoint's file is
    truncated: the run notices at resume, sets it aside and goes on from the one before."""
    run_dir = tmp_path / "run"
    output = killed_while_saving("model@4", run_dir)
    assert "SIGKILL while writing checkpoint-4 (model)" in output
    assert checkpoints(run_dir) == {"checkpoint-2": True, "checkpoint-4": False}
    assert (run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").is_file()

    output = killed_while_saving("optimizer@6", run_dir)
    assert f"removing {run_dir}/checkpoints/checkpoint-4: a save that did not finish" in output
    assert f"resuming from {run_dir}/checkpoints/checkpoint-2\n" in output
    assert checkpoints(run_dir) == {"checkpoint-2": True, "checkpoint-4": True, "checkpoint-6": False}

    output = killed_while_saving("trainer_state@8", run_dir)
    assert f"resuming from {run_dir}/checkpoints/checkpoint-4\n" in output
    # checkpoint-2 went only once checkpoint-6 was complete; 8 has every file but no marker
    assert checkpoints(run_dir) == {"checkpoint-4": True, "checkpoint-6": True, "checkpoint-8": False}
    assert (run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file()

    adapter = run_dir / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    with adapter.open("r+b") as file:
        file.truncate(size - 1000)
    result = run_train(f"hydra.run.dir={run_dir}", *RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert (
        f"not resuming from {run_dir}/checkpoints/checkpoint-6, changed since it was marked complete: "
        f"adapter_model.safetensors has {size - 1000:,} bytes ({size:,} when written); moved to "
        "checkpoint-6.damaged, trying the one before"
    ) in output
    assert f"resuming from {run_dir}/checkpoints/checkpoint-4\n" in output
    assert logged_steps(run_dir) == list(range(1, 9))  # every step once, across four processes
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert checkpoints(run_dir) == {"checkpoint-6": True, "checkpoint-6.damaged": True, "checkpoint-8": True}


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: a tmpfs of a chosen size (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()

    def size(megabytes: int) -> Path:
        action = "remount," if os.path.ismount(disk) else ""
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"{action}size={megabytes}m", "tmpfs", str(disk)], check=True
        )
        return disk

    yield size
    if os.path.ismount(disk):
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_what_it_needs_and_it_resumes_once_freed(tmp_path, small_disk):
    """A checkpoint here is ~17.6 MB (tokenizer.json is 17.2 MB of it). On 10 MB the first save fails part
    way: the run says where and how much was written, and removes the unfinished checkpoint. On 30 MB
    checkpoint-2 fits; checkpoint-4 would not, which the run says before writing it, checkpoint-2 intact.
    On 80 MB the same command goes on from checkpoint-2 to the end."""
    run_dir = small_disk(10) / "run"
    result = run_train(f"hydra.run.dir={run_dir}", *RUN, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    error = last_error(result.stderr)
    assert error.startswith(
        f"error: no space left on the file system of {run_dir}/checkpoints while writing checkpoint-2 ("
    ), result.stderr[-3000:]
    assert "a checkpoint of this run needs more than the " in error and "bytes written" in error
    assert error.endswith(
        "No checkpoint of this run is complete yet: free space, then run the same command again."
    )
    assert "Traceback" not in result.stderr
    assert checkpoints(run_dir) == {}  # the unfinished one is removed: its space is given back

    small_disk(30)
    result = run_train(f"hydra.run.dir={run_dir}", *RUN, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    error = last_error(result.stderr)
    size = sum(
        record[0]
        for record in json.loads((run_dir / "checkpoints/checkpoint-2/COMPLETE").read_text())[
            "files"
        ].values()
    )
    assert error.startswith(
        f"error: not enough space on the file system of {run_dir}/checkpoints for checkpoint-4: it needs "
        f"about {size:,} bytes (0.02 GiB, as checkpoint-2), "
    ), result.stderr[-3000:]
    assert error.endswith(
        f"{run_dir}/checkpoints/checkpoint-2 is complete and untouched: free space (or give the run a "
        "larger volume), then run the same command with training.resume_from_checkpoint=latest (python -m "
        "launch passes it) to go on."
    )
    assert checkpoints(run_dir) == {"checkpoint-2": True}

    small_disk(80)
    result = run_train(f"hydra.run.dir={run_dir}", *RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/checkpoint-2\n" in result.stdout
    assert logged_steps(run_dir) == list(range(1, 9))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
