"""``python tests/faults/kill_during_save.py <point>@<step> <train overrides>``: ``python -m train`` that
SIGKILLs itself while it writes ``checkpoint-<step>``, the way an OOM killer, a node failure or Slurm's
SIGKILL after its grace time ends a process: no handler runs, nothing is flushed.

Points, in the order Trainer._save_checkpoint writes:
    model          the model (adapter) files are written, the optimizer not yet
    optimizer      optimizer.pt is half written (a torn file)
    trainer_state  every file is written, the COMPLETE marker not yet
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from transformers import Trainer, TrainerState

point, _, step = sys.argv.pop(1).partition("@")
target = f"checkpoint-{step}"


def kill() -> None:
    print(f"fault injection: SIGKILL while writing {target} ({point})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def at(point_name: str, original):
    def wrapped(self, *args, **kwargs):
        path = Path(next((arg for arg in (*args, *kwargs.values()) if isinstance(arg, str)), ""))
        writing_target = target in (path.name, path.parent.name)  # the checkpoint, or a file in it
        if point == "model" and point_name == "optimizer" and writing_target:
            kill()  # before the optimizer is written
        result = original(self, *args, **kwargs)
        if point == point_name and writing_target:
            if point == "optimizer":
                optimizer = path / "optimizer.pt"
                with optimizer.open("r+b") as file:
                    file.truncate(optimizer.stat().st_size // 2)
            kill()
        return result

    return wrapped


Trainer._save_optimizer_and_scheduler = at("optimizer", Trainer._save_optimizer_and_scheduler)
TrainerState.save_to_json = at("trainer_state", TrainerState.save_to_json)
sys.argv[0] = "train"
runpy.run_module("train", run_name="__main__", alter_sys=True)
