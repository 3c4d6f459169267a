"""The on-disk cache shared by the tokenizer and prepared datasets: where it is, how an entry is named and
written."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_HASHES = "source-hashes"  # a folder in a cache: one small JSON per source file hashed
SCRATCH = ".tmp-"  # how the name of an entry still being written begins; it never counts as an entry
_HOST = socket.gethostname()  # scratch names end in "@<host>": only this machine's are ever removed here


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/llama31-finetune/<kind>`` (``~/.cache`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama31-finetune" / kind


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``target`` that becomes ``target`` when the block succeeds.

    Readers never see a half-written entry: the entry appears whole, by one ``rename`` (atomic on a
    local or NFS file system), so ranks and nodes writing the same entry at once are safe; if another
    process finished it first, its copy is kept and this one discarded. A writer killed before the
    rename leaves only its scratch (``SCRATCH``), never read; the next write in the same folder on the
    same machine removes it (``_remove_abandoned``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent)
    scratch, lock = _locked_scratch(target)
    try:
        yield scratch
        try:
            scratch.rename(target)
        except OSError:
            if not target.is_dir():  # not "another process saved it first": a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)


def _locked_scratch(target: Path) -> tuple[Path, int]:
    """A new scratch directory for ``target`` and a descriptor holding a ``flock`` on it: the kernel
    drops the lock when this process dies, however it dies, which is how ``_remove_abandoned`` tells a
    scratch still being written from one left by a killed writer."""
    while True:
        scratch = target.parent / f"{SCRATCH}{target.name}-{uuid.uuid4().hex}@{_HOST}"
        # not tempfile.mkdtemp: its mode 0700 would hide the entry from a shared cache's group
        scratch.mkdir()
        try:
            lock = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed before it was locked, by another writer's _remove_abandoned
            continue
        with contextlib.suppress(OSError):  # a file system without locks: nobody can remove it either
            fcntl.flock(lock, fcntl.LOCK_EX)
        if scratch.is_dir():
            return scratch, lock
        os.close(lock)  # removed while this waited for the lock: take another name


def _remove_abandoned(folder: Path) -> None:
    """Remove the scratch directories in ``folder`` that writers on this machine left when killed:
    those whose lock is free. Other machines' are left alone: their locks may not be seen here (a
    ``flock`` on an NFS directory never is: the kernel keeps it on the machine that holds it)."""
    for scratch in folder.iterdir():
        if not (scratch.name.startswith(SCRATCH) and scratch.name.endswith(f"@{_HOST}")):
            continue
        try:
            lock = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone already, or not a directory
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive (or this file system has no locks): keep it
            continue
        else:
            log.info("removing %s, left by a write that was killed", scratch)
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            os.close(lock)


def source_sha256(path: Path, cache: Path) -> str:
    """The SHA-256 of ``path``'s bytes, read once: the digest is kept in ``cache`` under the file's
    absolute path, size and modification time, so later starts (any rank, any requeue) do not read a
    multi-GB source again. Changing the file changes its size or mtime, and it is hashed again.

    A rewrite that keeps both size and mtime (``touch -d`` back to the old time) goes unseen.
    """
    path = path.resolve()
    record = cache / SOURCE_HASHES / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    stat = path.stat()
    identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if record.is_file():
        saved = json.loads(record.read_text())
        if {key: saved.get(key) for key in identity} == identity:
            log.info("source hash from cache: %s", path)
            return saved["sha256"]
    log.info("hashing %s (%.1f MB) for the cache key", path, stat.st_size / 1e6)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):  # not changed while read
        _write_atomically(record, json.dumps({**identity, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def sources_sha256(files: Sequence[Path], cache: Path) -> str:
    """The key of a source of several files (shards, a saved dataset's files): each file's name and
    ``source_sha256``, in order, hashed together. One file keys as ``source_sha256`` alone, as it did
    before sources could have several."""
    if len(files) == 1:
        return source_sha256(files[0], cache)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\t{source_sha256(file, cache)}\n".encode())
    return digest.hexdigest()


def cache_entry(
    path: Path | Sequence[Path],
    tokenizer,
    settings: dict,
    cache: str | os.PathLike | None = None,
    *,
    kind: str = "",
    name: str | None = None,
) -> Path:
    """Where a source prepared with ``settings`` is cached: ``<cache>/<name>[-kind]-<key>``, the key a hash
    of the source's bytes (hashed once per file version, ``source_sha256``; every file of a source of
    several, ``sources_sha256``), the tokenizer and the settings. ``name`` None: the (first) file's stem.
    ``cache`` None: ``cache_dir("datasets")``."""
    cache = Path(cache or cache_dir("datasets"))
    files = [path] if isinstance(path, Path) else list(path)
    key = hashlib.sha256(sources_sha256(files, cache).encode())
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(json.dumps(settings, sort_keys=True).encode())
    name = re.sub(r"[^\w.-]+", "_", name or files[0].name.split(".")[0])
    return cache / "-".join([name, *([kind] if kind else []), key.hexdigest()[:16]])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the tokenizer.json it was loaded from (cheap),
    else its serialised backend, plus the chat template."""
    saved = Path(str(tokenizer.name_or_path)) / "tokenizer.json"
    content = saved.read_bytes() if saved.is_file() else tokenizer.backend_tokenizer.to_str().encode()
    return hashlib.sha256(content + (tokenizer.chat_template or "").encode()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False)
    try:
        with file:
            file.write(text)
        os.replace(file.name, path)
    finally:
        Path(file.name).unlink(missing_ok=True)
