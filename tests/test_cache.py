"""The on-disk cache: entries appear whole, and a source file is hashed once per version."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid

import pytest
from conftest import REPO

from data.cache import SCRATCH, SOURCE_HASHES, atomic_directory, source_sha256


def test_an_entry_appears_whole_and_the_first_writer_wins(tmp_path):
    target = tmp_path / "entry"
    with atomic_directory(target) as scratch:
        (scratch / "rows").write_text("first")
        assert not target.exists()  # nothing visible until the block succeeds
    with atomic_directory(target) as scratch:  # another rank or node, finishing the same entry later
        (scratch / "rows").write_text("second")
    assert (target / "rows").read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]  # no scratch left behind


def test_a_failed_block_or_rename_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "entry"):
        raise RuntimeError("encoding failed")
    (tmp_path / "taken").write_text("a file, not an entry")
    with pytest.raises(NotADirectoryError), atomic_directory(tmp_path / "taken"):
        pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


WRITE_AND_WAIT = """
import sys, time
from pathlib import Path
from data.cache import atomic_directory
with atomic_directory(Path(sys.argv[1])) as scratch:
    (scratch / "rows").write_text("half")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_scratch_is_removed_and_a_live_ones_kept(tmp_path, caplog):
    """A writer SIGKILLed mid-entry leaves its scratch, never the entry; the next write in the folder
    removes it, but not while its writer lives (its lock is held), and never another machine's or an
    unmarked one (an older version's): their writers' locks cannot be seen from here."""
    caplog.set_level(logging.INFO, logger="data.cache")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_AND_WAIT, str(tmp_path / "theirs")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline() == "writing\n"
        elsewhere = tmp_path / f"{SCRATCH}entry-{uuid.uuid4().hex}@another-machine"
        unmarked = tmp_path / f"{SCRATCH}entry-{uuid.uuid4().hex}"
        elsewhere.mkdir()
        unmarked.mkdir()
        with atomic_directory(tmp_path / "mine") as scratch:
            (scratch / "rows").write_text("mine")
        (theirs,) = [path for path in tmp_path.iterdir() if path.name.startswith(f"{SCRATCH}theirs-")]
        assert (theirs / "rows").read_text() == "half"  # being written: kept
    finally:
        writer.kill()
        writer.wait()
    assert not (tmp_path / "theirs").exists()
    with atomic_directory(tmp_path / "next") as scratch:
        (scratch / "rows").write_text("next")
    assert caplog.messages == [f"removing {theirs}, left by a write that was killed"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["mine", "next", elsewhere.name, unmarked.name]
    )


def hashing(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "data.cache" and "hashing" in r.getMessage()]


def test_a_source_is_hashed_once_per_version(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.cache")
    source, cache = tmp_path / "chats.jsonl", tmp_path / "cache"
    source.write_text("one\n")
    digest = hashlib.sha256(b"one\n").hexdigest()
    assert source_sha256(source, cache) == digest and len(hashing(caplog)) == 1
    (record,) = (cache / SOURCE_HASHES).iterdir()
    assert json.loads(record.read_text())["path"] == str(source.resolve())

    assert source_sha256(source, cache) == digest
    assert len(hashing(caplog)) == 1 and f"source hash from cache: {source.resolve()}" in caplog.messages

    stat = source.stat()
    os.utime(
        source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000)
    )  # touched: same bytes, new mtime
    assert source_sha256(source, cache) == digest and len(hashing(caplog)) == 2

    stat = source.stat()
    source.write_text("two!\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # another size, the old mtime
    assert source_sha256(source, cache) == hashlib.sha256(b"two!\n").hexdigest()
    assert len(hashing(caplog)) == 3 and len(list((cache / SOURCE_HASHES).iterdir())) == 1
