"""Checkpoints a long run can trust: marked complete only once every rank has written its part,
and a stop request (SIGTERM from a preempting scheduler, USR1 before a time limit, or a person) that
checkpoints, then stops.

The trainer writes ``checkpoints/checkpoint-<step>/`` in place, rank by rank, so a job killed while
saving leaves a directory that looks like a checkpoint but is not one. ``COMPLETE`` is written into
it after every rank has finished, listing every file's size and CRC-32 (the ranks share the reading); a
resumed run takes the newest complete checkpoint whose files still match (``resume_point``) and sets a
damaged one aside, saying why. Old checkpoints are rotated away (``training.save_total_limit``) only after
the new one is complete, never the newest complete one; a save that would not fit on the disk stops the
run with the bytes it needs, leaving the earlier checkpoints as they were.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from train.run.run_dir import (
    COMPLETE_MARKER,
    DAMAGED_SUFFIX,
    STOP_FILE,
    STOPPED_FILE,
    checkpoint_bytes,
    checkpoint_files,
    checkpoint_steps,
    complete_checkpoints,
    damage,
    file_record,
    manifest_text,
    read_manifest,
)

# Slurm sends SIGTERM to every task on preemption and scancel (then SIGKILL after GraceTime/KillWait),
# torchrun and `accelerate launch` pass it on to their workers; USR1 is Slurm's warning before a limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger("train")


def _everyone(accelerator, flag: bool) -> bool:
    """True on every rank when it is true on any: ranks must agree on the step they stop at."""
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint ``COMPLETE`` once all ranks wrote it; on a stop request, saves one more at the
    next step boundary and stops.

    A stop request is SIGTERM or USR1 to any training process (while it trains, a handler only notes it),
    or the file ``<run dir>/checkpoint-and-stop`` (the Slurm job script's USR1 trap creates it; so can a
    person). Every rank checks after each step and they agree (one all-reduce of one number), so all
    stop after the same step, even when only one node was signalled or saw the file. A request that
    arrives while a periodic checkpoint is being written stops right after it: no second save.
    Once stopped, ``<run dir>/stopped`` says at which step and why: the job script requeues on it.
    """

    def __init__(self, trainer, run_dir: Path, keep: int | None = None, checksums: bool = True):
        self.trainer, self.run_dir = trainer, run_dir
        self.keep, self.checksums = keep, checksums  # training.save_total_limit, .checkpoint_checksums
        self.signalled: str | None = None  # the stop signal this process received, by name
        self.stopping = False
        self._previous_handlers: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (self.run_dir / STOPPED_FILE).unlink(missing_ok=True)  # going on: an earlier stop is history
            for path in checkpoint_steps(Path(args.output_dir)).values():
                if not (path / COMPLETE_MARKER).is_file():  # a save that was killed: never resumable
                    log.info("removing %s: a save that did not finish (no %s marker)", path, COMPLETE_MARKER)
                    shutil.rmtree(path, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for number in STOP_SIGNALS:
                self._previous_handlers[number] = signal.signal(number, self._note_signal)

    def on_train_end(self, args, state, control, **kwargs):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def _note_signal(self, number: int, frame) -> None:
        self.signalled = signal.Signals(number).name

    def _stop_requested(self) -> bool:
        requested = self.signalled is not None or (self.run_dir / STOP_FILE).exists()
        return _everyone(self.trainer.accelerator, requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested():
            self.stopping = True
            if state.is_world_process_zero:
                log.info(
                    "stop requested (%s): checkpoint at step %d, then stop", self._reason(), state.global_step
                )
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            self._before_save(args, state)
        return control

    def _before_save(self, args, state) -> None:
        """The checkpoint about to be written is not complete until its marker is rewritten; and it must fit:
        a disk that cannot hold another checkpoint the size of the last stops the run before it writes."""
        checkpoints = Path(args.output_dir)
        problem = None
        if state.is_world_process_zero:
            (checkpoints / f"checkpoint-{state.global_step}" / COMPLETE_MARKER).unlink(missing_ok=True)
            newest = _newest_complete(checkpoints)
            needed = checkpoint_bytes(newest) if newest else None
            free = shutil.disk_usage(checkpoints).free if checkpoints.is_dir() else None
            if needed is not None and free is not None and free < needed:
                problem = CheckpointSpaceError(
                    f"not enough space on the file system of {checkpoints} for checkpoint-{state.global_step}"
                    f": it needs about {needed:,} bytes ({needed / 2**30:.2f} GiB, as {newest.name}), "
                    f"{free:,} bytes are free. {_resume_advice(newest)}"
                )
        if _everyone(self.trainer.accelerator, problem is not None):
            raise problem or CheckpointSpaceError(f"rank 0 found no space for checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()  # every rank's shards, optimizer and RNG states are on disk
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        records = _shared(
            accelerator,
            checkpoint_files(checkpoint),
            lambda name: file_record(checkpoint / name, self.checksums),
        )
        if accelerator.is_main_process:
            _write_synced(checkpoint / COMPLETE_MARKER, manifest_text(state.global_step, dict(records)))
            rotate(Path(args.output_dir), self.keep, state.best_model_checkpoint)
        accelerator.wait_for_everyone()
        if not self.stopping and self._stop_requested():  # it came while this periodic checkpoint was written
            self.stopping = True
            control.should_training_stop = True
        if self.stopping:
            if state.is_world_process_zero:
                self._record_stop(state)
            # before any rank exits: a launcher that sees one process end may kill the others (srun
            # --kill-on-bad-exit), and the job script requeues only when it finds `stopped`
            accelerator.wait_for_everyone()
        return control

    def _record_stop(self, state) -> None:
        reason = self._reason()
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # honoured; a resumed run must not stop again
        if state.global_step < state.max_steps:  # at the last step the run finishes and saves its model
            _write_synced(self.run_dir / STOPPED_FILE, f"{state.global_step} {reason}\n")
        log.info("checkpoint-%d is complete; stopping (%s)", state.global_step, reason)

    def _reason(self) -> str:
        if self.signalled:
            return self.signalled
        return STOP_FILE if (self.run_dir / STOP_FILE).exists() else "another process's request"


def _write_synced(path: Path, text: str) -> None:
    """All of ``text`` or nothing at ``path``, on disk when this returns: a kill leaves no half marker."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)


class CheckpointSpaceError(RuntimeError):
    """A checkpoint did not fit on its file system: the message says where, how much, and how to go on."""


def _newest_complete(checkpoints: Path) -> Path | None:
    complete = complete_checkpoints(checkpoints)
    return complete[-1] if complete else None


def _resume_advice(newest: Path | None) -> str:
    if newest is None:
        return "No checkpoint of this run is complete yet: free space, then run the same command again."
    return (
        f"{newest} is complete and untouched: free space (or give the run a larger volume), then run the "
        "same command with training.resume_from_checkpoint=latest (python -m launch passes it) to go on."
    )


def _shared(accelerator, names: list[str], work) -> list:
    """``[(name, work(name))]`` for every name in rank 0's list, each rank doing every num_processes-th
    one (reading a 0.85 TB checkpoint back is shared by all ranks, not left to one)."""
    if accelerator.num_processes == 1:
        return [(name, work(name)) for name in names]
    from accelerate.utils import broadcast_object_list, gather_object

    names = broadcast_object_list([names], from_process=0)[0]
    return gather_object(
        [(name, work(name)) for name in names[accelerator.process_index :: accelerator.num_processes]]
    )


def resume_point(checkpoints: Path, accelerator) -> Path | None:
    """The newest complete checkpoint whose files still match its marker (sizes, and CRC-32 where recorded;
    the ranks share the reading). A damaged one is renamed ``checkpoint-<step>.damaged``, the log says which
    files differ, and the one before it is tried."""
    for checkpoint in reversed(complete_checkpoints(checkpoints)):
        records = read_manifest(checkpoint)
        if records is None:
            return checkpoint
        check = functools.partial(_damage_of_one, checkpoint, records)
        problems = [problem for _, found in _shared(accelerator, sorted(records), check) for problem in found]
        if not problems:
            return checkpoint
        if accelerator.is_main_process:
            aside = checkpoint.with_name(checkpoint.name + DAMAGED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            log.warning(
                "not resuming from %s, changed since it was marked complete: %s; moved to %s, "
                "trying the one before", checkpoint, "; ".join(problems), aside.name,
            )  # fmt: skip
        accelerator.wait_for_everyone()
    return None


def _damage_of_one(checkpoint: Path, records: dict[str, list], name: str) -> list[str]:
    return damage(checkpoint, [name], records)


def rotate(checkpoints: Path, keep: int | None, best: str | None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and the best one); unfinished saves older than the
    newest complete one go too. Called once the newest is complete, so it is never one that goes."""
    steps, complete = checkpoint_steps(checkpoints), complete_checkpoints(checkpoints)
    if not complete:
        return
    newest = max(step for step, path in steps.items() if path == complete[-1])
    doomed = [path for step, path in steps.items() if path not in complete and step < newest]
    if keep:
        doomed += complete[: max(len(complete) - keep, 0)]
    for path in doomed:
        if best is None or Path(best).resolve() != path.resolve():
            shutil.rmtree(path, ignore_errors=True)


def out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether a save failed because its file system is full: ENOSPC anywhere in the exception chain, or
    a failure with < 64 MiB free (torch.save only says "unexpected pos ...; basic_ios::clear")."""
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < 64 << 20
    except OSError:
        return False


def space_error(checkpoint: Path, error: BaseException, is_main: bool) -> CheckpointSpaceError:
    """The error a full disk during a save becomes. The unfinished checkpoint is removed (rank 0) to give the
    space back; the earlier ones are untouched."""
    written = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    if is_main:
        shutil.rmtree(checkpoint, ignore_errors=True)
    newest = _newest_complete(checkpoint.parent)
    size = checkpoint_bytes(newest) if newest else None
    needed = (
        f"about {size:,} bytes (as {newest.name})" if size else f"more than the {written:,} bytes written"
    )
    free = shutil.disk_usage(checkpoint.parent).free
    return CheckpointSpaceError(
        f"no space left on the file system of {checkpoint.parent} while writing {checkpoint.name} ({error}): "
        f"a checkpoint of this run needs {needed}; {free:,} bytes are free now that the unfinished "
        f"{checkpoint.name} is removed. {_resume_advice(newest)}"
    )
