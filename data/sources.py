"""Sources: where a data path points, and the records in it, read lazily.

A source (``locate_source``) is one local file (JSON lines, a JSON list, either gzipped, or parquet), a
directory or glob of such files (shards, read in sorted order), a ``datasets`` ``save_to_disk``
directory, or ``hf:<name>[:<split>]``, a dataset in the local Hugging Face datasets cache, read offline.
``read_records`` yields each record with where it came from (file:line, record N, row N), so a reader
(``data.readers``, ``data.preference``) names a bad one exactly.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.config import GLOB_CHARS, HF_PREFIX


class DataError(ValueError):
    """A record or file that cannot be used; the message names file, line and fix."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


Report = Callable[[str, DataError], None]


@dataclass
class Progress:
    """How far a read of a source's files has come: ``done`` of ``total`` bytes (on disk: compressed
    bytes of a gzipped file), advanced as records are yielded. A saved or cached dataset counts none."""

    total: int = 0
    done: int = 0


# ── sources: a file, shards, a saved dataset, a dataset in the Hugging Face cache ───────────
SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
SOURCE_KINDS = (
    "a local file, a directory or glob of shards (jsonl/json/parquet), a save_to_disk directory or "
)
SOURCE_KINDS += f"{HF_PREFIX}<name>[:<split>]"


@dataclass(frozen=True)
class Source:
    """A source path located: its ``kind`` (``file``, ``shards``, ``saved``: a ``save_to_disk`` directory,
    ``hf``: the local Hugging Face cache), the ``files`` whose bytes make its cache key, and a ``name`` for
    its cache entry."""

    path: str
    kind: str
    files: tuple[Path, ...]
    name: str
    split: str = ""  # hf: the split read


def locate_source(path: str | Path) -> Source:
    """What ``path`` names, without reading records; raises ``DataError`` naming what was looked for."""
    spec = str(path)
    if spec.startswith(HF_PREFIX):
        return _hub_cache_source(spec)
    if any(char in spec for char in GLOB_CHARS):
        shards = sorted(Path(match) for match in glob.glob(spec) if Path(match).is_file())
        if not shards:
            raise DataError(
                "missing file", f"{spec}: no files match this glob; point data.path at {SOURCE_KINDS}"
            )
        return _shards(spec, shards, Path(spec).parent.name)
    located = Path(spec)
    if located.is_file():
        return Source(spec, "file", (located,), located.name.split(".")[0])
    if not located.is_dir():
        raise DataError("missing file", f"{spec}: no such file; set data.path to {SOURCE_KINDS}")
    if (located / "dataset_dict.json").is_file():
        raise DataError(
            "missing file",
            f"{spec}: a DatasetDict saved with save_to_disk; point data.path at one split's directory, "
            f"e.g. {located / 'train'}",
        )
    if (located / "state.json").is_file() and (located / "dataset_info.json").is_file():
        files = tuple(sorted(file for file in located.iterdir() if file.is_file()))
        return Source(spec, "saved", files, located.name)
    shards = sorted(
        file for file in located.iterdir() if file.is_file() and file.name.endswith(SHARD_SUFFIXES)
    )
    if not shards:
        raise DataError(
            "missing file",
            f"{spec}: no {'/'.join('*' + suffix for suffix in SHARD_SUFFIXES)} files in this directory, and "
            "no save_to_disk dataset (state.json, dataset_info.json); point data.path at the data",
        )
    return _shards(spec, shards, located.name)


def _shards(spec: str, shards: list[Path], name: str) -> Source:
    """Shards of one format: a parquet shard beside JSON ones would be read as two different shapes."""
    kinds = {"parquet" if shard.suffix == ".parquet" else "json" for shard in shards}
    if len(kinds) > 1:
        raise DataError(
            "mixed shards", f"{spec}: both parquet and JSON shards ({shards[0].name}, ...); keep one format"
        )
    return Source(spec, "shards", tuple(shards), name)


def _hub_cache_source(spec: str) -> Source:
    """``hf:<name>[:<split>]`` found in the Hugging Face datasets cache (``HF_DATASETS_CACHE``): the split's
    Arrow files and the dataset's info."""
    builder, split = _cached_builder(spec)
    files = [Path(file["filename"]) for file in _hub_split(builder, spec, split).cache_files]
    files.append(Path(builder.cache_dir) / "dataset_info.json")
    return Source(spec, "hf", tuple(files), builder.dataset_name, split)


def _cached_builder(spec: str):
    """datasets' own reader of its cache (what ``load_dataset`` uses offline: datasets/load.py
    CachedDatasetModuleFactory), and the split asked for."""
    import datasets.config
    from datasets.packaged_modules.cache.cache import Cache

    name, _, split = spec.removeprefix(HF_PREFIX).partition(":")
    split = split or "train"
    cache = datasets.config.HF_DATASETS_CACHE
    try:
        with _offline():
            builder = Cache(
                cache_dir=str(cache),
                repo_id=name,
                dataset_name=name.split("/")[-1],
                version="auto",
                hash="auto",
            )
    except ValueError as error:  # "Couldn't find cache for ...", or several configurations of it
        raise DataError(
            "missing dataset",
            f"{spec}: no cached dataset {name} split {split} under {cache} ({str(error).splitlines()[0]}); "
            f"nothing is downloaded: run datasets.load_dataset({name!r}, split={split!r}) once with network, "
            "or point data.path at files",
        ) from None
    return builder, split


def _hub_split(builder, spec: str, split: str):
    if split not in (splits := list(builder.info.splits or {})):
        raise DataError(
            "missing dataset",
            f"{spec}: no cached dataset {builder.repo_id} split {split} under {builder.cache_dir} "
            f"(its splits: {', '.join(splits)}); name one as {HF_PREFIX}{builder.repo_id}:<split>",
        )
    with _offline():
        return builder.as_dataset(split=split)


@contextmanager
def _offline() -> Iterator[None]:
    """No network for a read of the cache: datasets and huggingface_hub offline, for this block only."""
    import datasets.config

    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved, was_offline = {name: os.environ.get(name) for name in names}, datasets.config.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(names, "1"))
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _dataset_rows(source: Source) -> Iterator[tuple[str, Any]]:
    """The rows of a saved dataset or a cached Hugging Face one, as records."""
    if source.kind == "saved":
        from datasets import load_from_disk

        dataset = load_from_disk(source.path)
    else:
        builder, split = _cached_builder(source.path)
        dataset = _hub_split(builder, source.path, split)
    for index, row in enumerate(dataset):
        yield f"{source.path} row {index}", row


# ── files → records ─────────────────────────────────────────────────────────────────
def read_records(
    path: str | Path, report: Report, progress: Progress | None = None
) -> Iterator[tuple[str, Any]]:
    """Each record of the source at ``path`` (``locate_source``) with where it is; JSON lines that cannot
    be decoded are reported. ``progress``: the bytes read so far, kept up to date (``Progress``).

    A JSON list or parquet file that cannot be decoded at all raises, whatever ``strict`` says.
    """
    source = locate_source(path)
    if source.kind in ("saved", "hf"):
        yield from _dataset_rows(source)
        return
    progress = progress if progress is not None else Progress()
    progress.total = sum(file.stat().st_size for file in source.files)
    for file in source.files:
        start = progress.done
        yield from _file_records(file, report, progress)
        progress.done = start + file.stat().st_size


def _file_records(path: Path, report: Report, progress: Progress) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    if _is_json_list(path, opener):
        yield from _json_list(path, opener)
        return
    start = progress.done
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) if opener is gzip.open else raw as lines:
        for number, line in enumerate(lines, start=1):
            progress.done = start + raw.tell()
            if not line.strip():
                continue
            try:
                record = _json_value(line.rstrip(b"\r\n"))
            except DataError as error:
                report(f"{path}:{number}", error)
                continue
            yield f"{path}:{number}", record


def _json_value(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError("not UTF-8", f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError("malformed JSON", f"malformed JSON ({error.msg}, column {error.colno})") from None


def _is_json_list(path: Path, opener) -> bool:
    try:
        with opener(path, "rb") as file:
            while chunk := file.read(1 << 12):
                if start := chunk.lstrip():
                    return start.startswith(b"[")
    except gzip.BadGzipFile:
        raise DataError(
            "not gzip", f"{path}: not a gzip file; remove the .gz suffix or compress it"
        ) from None
    return False


def _json_list(path: Path, opener) -> Iterator[tuple[str, Any]]:
    with opener(path, "rb") as file:
        raw = file.read()
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        detail = (
            f"{path}: not valid UTF-8 ({error.reason} at byte {error.start}); re-encode the file as UTF-8"
        )
        raise DataError("not UTF-8", detail) from None
    except json.JSONDecodeError as error:
        detail = f"{path}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno}); fix the file"
        raise DataError("malformed JSON", detail) from None
    for index, record in enumerate(records):
        yield f"{path} record {index}", record


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        batches = pq.ParquetFile(path).iter_batches()
    except pa.ArrowException as error:
        raise DataError("not parquet", f"{path}: not a readable parquet file ({error})") from None
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path} row {index}", row
            index += 1
