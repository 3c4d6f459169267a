"""What a run directory holds, for the run itself and for whoever launches, resumes or reads it.

    outputs/<date>/<time>/
        config.yaml                  the fully resolved config (``run_config`` reads it back, typed)
        checkpoints/checkpoint-<step>/COMPLETE
                                     a checkpoint every rank finished writing (``latest_checkpoint``)
        checkpoint-and-stop          a stop request: checkpoint at the next step, then stop
        stopped                      the run stopped early at a complete checkpoint, asked to; resume it

No torch, transformers or Hydra here (``launch`` renders and submits jobs with it, instantly);
``run_config`` imports the config schema when called.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import Config

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # inside a checkpoint: written once every rank has written its part
STOP_FILE = "checkpoint-and-stop"  # a request: save a checkpoint at the next step, then stop
STOPPED_FILE = "stopped"  # the answer: "<step> <reason>", written once that checkpoint is complete
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


def run_config(run_dir: Path) -> Config:
    """The typed config a run was trained with, from its ``config.yaml``."""
    from omegaconf import OmegaConf

    from train.config import Config, ConfigError, load_config

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; run= must name a run directory (outputs/<date>/<time>)")
    return load_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)), check=False)
