"""Checkpoints a long run can trust: marked complete only once every rank has written its part,
and a stop request (Slurm's USR1 before the time limit, or a person) that checkpoints, then stops.

The trainer writes ``checkpoints/checkpoint-<step>/`` in place, rank by rank, so a job killed while
saving leaves a directory that looks like a checkpoint but is not one. ``COMPLETE`` is written into
it after every rank has finished; ``latest_checkpoint`` resumes only from such a directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

COMPLETE_MARKER = "COMPLETE"
STOP_FILE = "checkpoint-and-stop"  # in the run directory: save a checkpoint at the next step, then stop
_STEP = re.compile(r"^checkpoint-(\d+)$")

log = logging.getLogger("train")


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that every rank finished writing, or None; incomplete ones are named."""
    complete, incomplete = [], []
    for path in checkpoints_dir.glob("checkpoint-*"):
        if (match := _STEP.match(path.name)) and path.is_dir():
            step = int(match.group(1))
            (complete if (path / COMPLETE_MARKER).is_file() else incomplete).append((step, path))
    newest = max(complete, default=None)
    for step, path in incomplete:
        if newest is None or step > newest[0]:
            log.warning(
                "skipping %s: it was not finished (no %s marker); resuming before it", path, COMPLETE_MARKER
            )
    return newest[1] if newest else None


def _everyone(accelerator, flag: bool) -> bool:
    """True on every rank when it is true on any: ranks must agree on the step they stop at."""
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint ``COMPLETE`` once all ranks wrote it; asks for a last one on a stop request.

    The stop request is a file, ``<run dir>/checkpoint-and-stop``: the Slurm job script creates it
    when USR1 arrives (``--signal=B:USR1@<seconds>``) and requeues the job once training has stopped.
    Every rank looks for it after each step and they agree (one all-reduce of one number), so all
    stop after the same step; on a shared file system one node may see the file a step later.
    """

    def __init__(self, trainer, run_dir: Path):
        self.trainer, self.stop_file = trainer, run_dir / STOP_FILE

    def on_step_end(self, args, state, control, **kwargs):
        if _everyone(self.trainer.accelerator, self.stop_file.exists()):
            if state.is_world_process_zero:
                log.info(
                    "stop requested (%s): checkpoint at step %d, then stop", self.stop_file, state.global_step
                )
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()  # every rank's shards, optimizer and RNG states are on disk
        if accelerator.is_main_process:
            marker = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER
            with marker.open("w") as file:
                file.write(f"{state.global_step}\n")
                file.flush()
                os.fsync(file.fileno())
        accelerator.wait_for_everyone()
        return control
