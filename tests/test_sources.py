"""Sources (data.sources.locate_source): a file, a directory or glob of shards, a save_to_disk directory, a
dataset in the local Hugging Face cache read offline; each missing one refused naming what was looked for."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE
from datasets.packaged_modules.json.json import Json

from data import DataError, load_conversations, load_preferences, prepare_dataset
from data.cache import SOURCE_HASHES
from data.sources import locate_source

LINES = SAMPLE.read_text().splitlines()
PAIRS = REPO / "data" / "samples" / "preference_sample.jsonl"


def conversations(path, format="messages", **settings) -> list[list[dict]]:
    return load_conversations(path, format, **settings).conversations


def shards(folder: Path, lines: list[str] = LINES, count: int = 3, suffix: str = ".jsonl") -> Path:
    """``lines`` cut into ``count`` JSONL shards in ``folder``, named so that sorted order is file order."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(lines) // count)
    for index in range(count):
        (folder / f"part-{index:02d}{suffix}").write_text(
            "\n".join(lines[index * size : (index + 1) * size]) + "\n"
        )
    return folder


def records() -> list[dict]:
    return [json.loads(line) for line in LINES]


# ── each kind reads as the file it was made from ─────────────────────────────────────
def test_a_directory_and_a_glob_of_jsonl_shards_read_in_sorted_order(tmp_path):
    folder = shards(tmp_path / "chats")
    (folder / "README.md").write_text("not a shard")  # other files in the directory are no shards
    expected = conversations(SAMPLE)
    assert conversations(folder) == expected
    assert conversations(f"{folder}/part-*.jsonl") == expected
    assert conversations(f"{folder}/part-0[12].jsonl") == expected[42:]
    source = locate_source(folder)
    assert (source.kind, source.name) == ("shards", "chats")
    assert [file.name for file in source.files] == ["part-00.jsonl", "part-01.jsonl", "part-02.jsonl"]


def test_a_bad_record_in_a_shard_is_named_by_its_shard_and_line(tmp_path):
    folder = shards(tmp_path / "chats", [*LINES[:4], "{not json", *LINES[4:6]], count=2)
    with pytest.raises(DataError, match=rf"{folder}/part-01.jsonl:1: malformed JSON"):
        load_conversations(folder, "messages", strict=True)
    result = load_conversations(folder, "messages")
    assert len(result.conversations) == 6 and result.dropped == {"malformed JSON": 1}


def test_parquet_and_json_list_shards(tmp_path):
    rows = records()
    for index in range(2):
        pq.write_table(
            pa.Table.from_pylist(rows[index * 63 : (index + 1) * 63]), tmp_path / f"p{index}.parquet"
        )
        json_list = tmp_path / "lists" / f"l{index}.json"
        json_list.parent.mkdir(exist_ok=True)
        json_list.write_text(json.dumps(rows[index * 63 : (index + 1) * 63]))
    expected = conversations(SAMPLE)
    assert conversations(f"{tmp_path}/*.parquet") == expected
    assert conversations(tmp_path / "lists") == expected


def test_a_save_to_disk_directory(tmp_path):
    datasets.Dataset.from_list(records()).save_to_disk(str(tmp_path / "saved"))
    assert conversations(tmp_path / "saved") == conversations(SAMPLE)
    source = locate_source(tmp_path / "saved")
    assert source.kind == "saved" and {"state.json", "dataset_info.json"} <= {f.name for f in source.files}
    result = load_conversations(tmp_path / "saved", "messages")
    assert result.source == str(tmp_path / "saved")


def hub_cache(root: Path, repo_id: str = "someone/chats") -> Path:
    """A dataset in a Hugging Face datasets cache at ``root``, as ``load_dataset(repo_id)`` leaves it: written
    by datasets' own Json builder (the builder a hub repo of JSON files loads with) under its hash, then named
    ``<namespace>___<name>`` as a namespaced repo's folder is (the builder names it so only when it fetched
    the files from the hub, which a test without network cannot)."""
    namespace, name = repo_id.split("/")
    validation = root.parent / "validation.jsonl"
    validation.write_text("\n".join(LINES[:6]) + "\n")
    builder = Json(
        cache_dir=str(root), dataset_name=name, hash="0123abcd", config_name="default", config_id="default",
        data_files={"train": [str(SAMPLE)], "validation": [str(validation)]},
    )  # fmt: skip
    builder.download_and_prepare()
    (root / name).rename(root / f"{namespace}___{name}")
    return root


def test_a_dataset_in_the_hugging_face_cache_is_read_offline_by_name(tmp_path, monkeypatch):
    from datasets.packaged_modules.cache.cache import Cache

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    online, reads = datasets.config.HF_HUB_OFFLINE, []
    as_dataset = Cache.as_dataset

    def offline_read(self, *args, **kwargs):
        reads.append(
            (
                os.environ.get("HF_HUB_OFFLINE"),
                os.environ.get("HF_DATASETS_OFFLINE"),
                datasets.config.HF_HUB_OFFLINE,
            )
        )
        return as_dataset(self, *args, **kwargs)

    monkeypatch.setattr(Cache, "as_dataset", offline_read)
    assert conversations("hf:someone/chats") == conversations(SAMPLE)  # split train by default
    assert conversations("hf:someone/chats:validation") == conversations(SAMPLE)[:6]
    source = locate_source("hf:someone/chats")
    assert (source.kind, source.split, source.name) == ("hf", "train", "chats")
    assert [file.name for file in source.files] == ["chats-train.arrow", "dataset_info.json"]
    # offline while the cache is read, and for that read only
    assert reads and set(reads) == {("1", "1", True)}
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert datasets.config.HF_HUB_OFFLINE == online


def test_every_kind_prepares_and_caches_keyed_on_every_file(tokenizer, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    folder = shards(tmp_path / "chats")
    cache = tmp_path / "cache"
    dataset, summary = prepare_dataset(folder, "messages", tokenizer, max_length=512, cache_dir=cache)
    single, _ = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert dataset["input_ids"] == single["input_ids"] and summary.source == str(folder)
    assert len(list((cache / SOURCE_HASHES).iterdir())) == 4  # each shard hashed, and the single file
    assert Path(summary.path).name.startswith("chats-")
    caplog.clear()
    prepare_dataset(folder, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert any(r.getMessage().startswith("prepared data from the cache") for r in caplog.records)
    (folder / "part-02.jsonl").write_text(LINES[-1] + "\n")  # one shard changed: a new entry
    changed, _ = prepare_dataset(folder, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert len(changed) == 85
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache(tmp_path / "hf"))
    datasets.Dataset.from_list(records()).save_to_disk(str(tmp_path / "saved"))
    for path in ("hf:someone/chats", tmp_path / "saved"):
        other, other_summary = prepare_dataset(path, "messages", tokenizer, max_length=512, cache_dir=cache)
        assert other["input_ids"] == single["input_ids"] and other_summary.source == str(path)


def test_preference_pairs_read_from_shards_too(tmp_path):
    folder = shards(tmp_path / "pairs", PAIRS.read_text().splitlines(), count=4)
    assert load_preferences(folder, "preference").records == load_preferences(PAIRS, "preference").records


# ── each missing source names what was looked for ────────────────────────────────────
def test_each_missing_source_is_refused_naming_what_was_looked_for(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no shard")
    refusals = {
        tmp_path / "absent.jsonl": f"{tmp_path}/absent.jsonl: no such file; set data.path to a local file, a "
        "directory or glob of shards",
        tmp_path
        / "empty": f"{tmp_path}/empty: no *.jsonl/*.json/*.parquet/*.jsonl.gz/*.json.gz files in this "
        "directory, and no save_to_disk dataset",
        f"{tmp_path}/*.parquet": f"{tmp_path}/*.parquet: no files match this glob",
    }
    for path, message in refusals.items():
        with pytest.raises(DataError) as error:
            load_conversations(path, "messages")
        assert message in str(error.value)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records()[:2])}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(
        DataError, match=f"a DatasetDict saved with save_to_disk; .* e.g. {tmp_path}/dd/train"
    ):
        load_conversations(tmp_path / "dd", "messages")
    assert len(conversations(tmp_path / "dd" / "train")) == 2
    shards(tmp_path / "mixed", LINES[:4], count=1)
    pq.write_table(pa.Table.from_pylist(records()[:2]), tmp_path / "mixed" / "more.parquet")
    with pytest.raises(DataError, match="both parquet and JSON shards"):
        load_conversations(tmp_path / "mixed", "messages")


def test_a_dataset_missing_from_the_hugging_face_cache_is_never_downloaded(tmp_path, monkeypatch):
    cache = hub_cache(tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    with pytest.raises(DataError) as error:
        load_conversations("hf:someone/absent", "messages")
    assert (
        f"hf:someone/absent: no cached dataset someone/absent split train under {cache} "
        "(Couldn't find cache for someone/absent); nothing is downloaded: run datasets.load_dataset("
        "'someone/absent', split='train') once with network, or point data.path at files"
    ) in str(error.value)
    with pytest.raises(
        DataError, match=r"no cached dataset someone/chats split test under .*\(its splits: train, "
    ):
        load_conversations("hf:someone/chats:test", "messages")


def test_training_validation_accepts_every_kind_and_refuses_what_is_not_there(tmp_path):
    from train.config import ConfigError, compose_config, load_config

    folder = shards(tmp_path / "chats")
    for path in (folder, f"{folder}/*.jsonl", "hf:someone/chats"):
        assert load_config(compose_config([f"data.path={path}"])).data.path == str(path)
    with pytest.raises(ConfigError) as error:
        load_config(compose_config([f"data.path={folder}/*.parquet"]))
    assert f"data.path: {folder}/*.parquet is not a file, a directory, a glob that matches" in str(
        error.value
    )
