"""Checkpoints a long run can trust: marked complete only once every rank has written its part,
and a stop request (SIGTERM from a preempting scheduler, USR1 before a time limit, or a person) that
checkpoints, then stops.

The trainer writes ``checkpoints/checkpoint-<step>/`` in place, rank by rank, so a job killed while
saving leaves a directory that looks like a checkpoint but is not one. ``COMPLETE`` is written into
it after every rank has finished; ``train.run_dir.latest_checkpoint`` resumes only from such a directory.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from train.run_dir import COMPLETE_MARKER, STOP_FILE, STOPPED_FILE

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

    def __init__(self, trainer, run_dir: Path):
        self.trainer, self.run_dir = trainer, run_dir
        self.signalled: str | None = None  # the stop signal this process received, by name
        self.stopping = False
        self._previous_handlers: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (self.run_dir / STOPPED_FILE).unlink(missing_ok=True)  # going on: an earlier stop is history
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
        return control

    def on_save(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()  # every rank's shards, optimizer and RNG states are on disk
        if accelerator.is_main_process:
            marker = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER
            _write_synced(marker, f"{state.global_step}\n")
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
    with path.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
