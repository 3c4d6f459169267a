"""What a run directory holds, for the run itself and for whoever launches, resumes or reads it.

    outputs/<date>/<time>/
        config.yaml                  the fully resolved config (``run_config`` reads it back, typed)
        checkpoints/checkpoint-<step>/COMPLETE
                                     a checkpoint every rank finished writing (``complete_checkpoints``);
                                     the marker lists each file's size and CRC-32 (``read_manifest``)
        checkpoints/checkpoint-<step>.damaged
                                     one whose files no longer match its marker, set aside at resume
        checkpoint-and-stop          a stop request: checkpoint at the next step, then stop
        stopped                      the run stopped early at a complete checkpoint, asked to; resume it

No torch, transformers or Hydra here (``launch`` renders and submits jobs with it, instantly);
``run_config`` imports the config schema when called.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import Config

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # inside a checkpoint: written once every rank has written its part
STOP_FILE = "checkpoint-and-stop"  # a request: save a checkpoint at the next step, then stop
STOPPED_FILE = "stopped"  # the answer: "<step> <reason>", written once that checkpoint is complete
DAMAGED_SUFFIX = ".damaged"  # checkpoint-<step>.damaged: its files do not match its marker any more
_STEP = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 16 << 20


def checkpoint_steps(checkpoints_dir: Path) -> dict[int, Path]:
    """Every ``checkpoint-<step>`` directory, complete or not, by step."""
    found = {}
    for path in checkpoints_dir.glob("checkpoint-*"):
        if (match := _STEP.match(path.name)) and path.is_dir():
            found[int(match.group(1))] = path
    return found


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The checkpoints every rank finished writing (a ``COMPLETE`` marker), oldest first."""
    steps = sorted(checkpoint_steps(checkpoints_dir).items())
    return [path for _, path in steps if (path / COMPLETE_MARKER).is_file()]


def checkpoint_files(checkpoint: Path) -> list[str]:
    """The files a checkpoint holds, relative to it, sorted; the marker excluded."""
    return sorted(
        str(path.relative_to(checkpoint))
        for path in checkpoint.rglob("*")
        if path.is_file() and path.name != COMPLETE_MARKER
    )


def file_record(path: Path, checksum: bool) -> list:
    """``[size in bytes, CRC-32 as 8 hex digits or None]``: what the marker records for one file. CRC-32 reads
    ~4 GiB/s on one core (zlib); it catches a torn or flipped file, not a deliberate edit."""
    crc = None
    if checksum:
        crc = 0
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        crc = f"{crc:08x}"
    return [path.stat().st_size, crc]


def manifest_text(step: int, records: dict[str, list]) -> str:
    """The marker's JSON, one file per line: ``"optimizer.pt": [243327, "5db25f2c"]``."""
    lines = ",\n".join(
        f"  {json.dumps(name)}: {json.dumps(record)}" for name, record in sorted(records.items())
    )
    return f'{{"step": {step}, "files": {{\n{lines}\n}}}}\n'


def read_manifest(checkpoint: Path) -> dict[str, list] | None:
    """The files recorded in a checkpoint's marker; None for a marker without them (written before
    checkpoints recorded their files): such a checkpoint is trusted as it is."""
    try:
        manifest = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("files") if isinstance(manifest, dict) else None


def checkpoint_bytes(checkpoint: Path) -> int | None:
    """What a complete checkpoint holds on disk, from its marker (None when the marker does not say)."""
    records = read_manifest(checkpoint)
    return None if records is None else sum(size for size, _ in records.values())


def damage(checkpoint: Path, names: Iterable[str], records: dict[str, list]) -> list[str]:
    """What differs between the named files and their records: missing, another size, another CRC-32."""
    problems = []
    for name in names:
        path, (size, crc) = checkpoint / name, records[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{name} has {actual:,} bytes ({size:,} when written)")
        elif crc is not None and (actual := file_record(path, checksum=True)[1]) != crc:
            problems.append(f"{name} has CRC-32 {actual} ({crc} when written)")
    return problems


def run_config(run_dir: Path) -> Config:
    """The typed config a run was trained with, from its ``config.yaml``."""
    from omegaconf import OmegaConf

    from train.config import Config, ConfigError, load_config

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; run= must name a run directory (outputs/<date>/<time>)")
    return load_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)), check=False)
