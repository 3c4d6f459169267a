"""The on-disk cache shared by the tokenizer and prepared datasets."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/llama31-finetune/<kind>`` (``~/.cache`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama31-finetune" / kind


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``target`` that becomes ``target`` when the block succeeds.

    Readers never see a half-written entry; if another process (another rank) finished the
    same entry first, its copy is kept and this one discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield scratch
        try:
            scratch.rename(target)
        except OSError:  # another process saved it first
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
