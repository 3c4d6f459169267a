"""Prepare: encoded rows, overflow policies, the on-disk cache, multiprocess map, the CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE
from test_quiet_output import assert_quiet

import data.prepare as prepare_module
from data import encode_chat, encode_conversations, load_conversations, prepare_dataset
from data.cache import SOURCE_HASHES

LONG_USER = [
    {"role": "user", "content": "word " * 400},
    {"role": "assistant", "content": "Short answer."},
]
FITS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! " * 20}]


def test_rows_are_the_encoder_output(tokenizer, tmp_path):
    dataset, summary = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=4096, cache_dir=tmp_path)
    conversations = load_conversations(SAMPLE, "messages").conversations
    assert len(dataset) == summary.conversations == len(conversations)
    for row, conversation in zip(dataset, conversations, strict=True):
        assert row == encode_chat(conversation, tokenizer)
    assert summary.tokens == sum(len(r) for r in dataset["input_ids"])
    assert summary.trainable_tokens == sum(sum(m) for m in dataset["assistant_masks"])
    assert summary.truncated == 0 and summary.dropped == {}
    assert sum(summary.length_histogram.values()) == len(conversations)


def entries(cache) -> list:
    """The prepared datasets in a cache (not the record of source hashes)."""
    return [path for path in cache.iterdir() if path.name != SOURCE_HASHES]


def test_cached_on_disk_and_reused(tokenizer, tmp_path, monkeypatch):
    first, summary = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=512, cache_dir=tmp_path)
    saved = entries(tmp_path)
    assert (
        len(saved) == 1
        and (saved[0] / "summary.json").is_file()
        and (saved[0] / "dataset_info.json").is_file()
    )
    assert summary.path == str(saved[0])
    monkeypatch.setattr(
        prepare_module, "load_conversations", lambda *a, **k: pytest.fail("read the source again")
    )
    again, cached_summary = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=512, cache_dir=tmp_path)
    assert again["input_ids"] == first["input_ids"] and cached_summary == summary


def test_cache_key_follows_source_content_and_settings(tokenizer, tmp_path):
    source = tmp_path / "chats.jsonl"
    source.write_text(json.dumps({"messages": FITS}) + "\n")
    cache = tmp_path / "cache"
    prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    prepare_dataset(source, "messages", tokenizer, max_length=256, cache_dir=cache)
    source.write_text(json.dumps({"messages": FITS}) + "\n" + json.dumps({"messages": FITS}) + "\n")
    dataset, _ = prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert len(dataset) == 2
    assert len(entries(cache)) == 3


def ours(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("data.")]


def test_a_second_start_reads_neither_the_source_nor_its_bytes(tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source, cache = tmp_path / "chats.jsonl", tmp_path / "cache"
    source.write_text(json.dumps({"messages": FITS}) + "\n")
    prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert ours(caplog) == [
        f"hashing {source} (0.0 MB) for the cache key",
        f"preparing {source}: not in the cache yet ({entries(cache)[0]})",
    ]
    caplog.clear()
    prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert ours(caplog) == [
        f"source hash from cache: {source}",
        f"prepared data from the cache: {entries(cache)[0]}",
    ]
    caplog.clear()
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, same entry
    prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert [message.split()[0] for message in ours(caplog)] == ["hashing", "prepared"]


def test_the_summary_names_this_runs_source(tokenizer, tmp_path):
    """Another checkout filled the cache with the same bytes: the summary names this run's file."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "mine").mkdir()
    theirs, mine, cache = (
        tmp_path / "theirs" / "chats.jsonl",
        tmp_path / "mine" / "chats.jsonl",
        tmp_path / "c",
    )
    theirs.write_text(json.dumps({"messages": FITS}) + "\n")
    shutil.copy(theirs, mine)
    _, filled = prepare_dataset(theirs, "messages", tokenizer, max_length=512, cache_dir=cache)
    _, summary = prepare_dataset(mine, "messages", tokenizer, max_length=512, cache_dir=cache)
    assert summary.source == str(mine) and str(summary).startswith(f"{mine}\n")
    assert summary.path == filled.path and summary.conversations == filled.conversations == 1


def test_truncate_keeps_learnable_rows_and_drops_the_rest(tokenizer):
    dataset, summary = encode_conversations(
        [FITS, LONG_USER, FITS[:1] + [{"role": "assistant", "content": "x " * 300}]],
        tokenizer,
        max_length=128,
    )
    assert summary.truncated == 1 and summary.conversations == 2
    assert summary.dropped == {"no assistant token within max_length=128": 1}
    assert [len(ids) for ids in dataset["input_ids"]] == [len(encode_chat(FITS, tokenizer)["input_ids"]), 128]
    assert all(any(mask) for mask in dataset["assistant_masks"])
    assert summary.length_histogram[">128"] == 2


def test_drop_policy_drops_everything_over_max_length(tokenizer):
    dataset, summary = encode_conversations([FITS, LONG_USER], tokenizer, max_length=128, overflow="drop")
    assert len(dataset) == 1 and summary.dropped == {"longer than max_length=128": 1}


def test_reader_drops_are_in_the_summary(tokenizer, tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text(json.dumps({"messages": FITS}) + "\n{broken\n")
    _, summary = prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=tmp_path / "c")
    assert summary.dropped == {"malformed JSON": 1}
    assert summary.examples[0].startswith(f"{source}:2:")
    assert "dropped 1 × malformed JSON" in str(summary)


def test_multiprocess_map_gives_the_same_rows(tokenizer):
    conversations = load_conversations(SAMPLE, "messages").conversations[:40]
    one, _ = encode_conversations(conversations, tokenizer, max_length=512, num_proc=1)
    two, _ = encode_conversations(conversations, tokenizer, max_length=512, num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["assistant_masks"] == two["assistant_masks"]


def test_cli_prepares_and_prints_the_summary(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            "data=sample",
            f"data.cache_dir={tmp_path}",
            "training.max_length=256",
        ],
        cwd=REPO,
        env={key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"},  # the user's
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "conversations" in result.stdout and "trainable" in result.stdout and "truncated" in result.stdout
    assert "length (tokens, before truncation)" in result.stdout and ">256" in result.stdout
    assert f"saved in {tmp_path}" in result.stdout
    assert_quiet(result.stdout + result.stderr)  # the summary, and no library note a user cannot act on


def test_cli_rejects_a_bad_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data.prepare", "data.formatt=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "formatt" in result.stderr


def test_data_imports_nothing_from_train():
    """``data`` stands alone (design.md): its pipeline and the config its command composes load no train."""
    code = (
        "import sys, data, data.prepare, data.rows, data.summary, data.cache\n"
        "from data import *\n"
        "from data.config import compose_config\n"
        "compose_config(['stage=dpo', 'data=preference_sample'])\n"
        "print(*[name for name in sys.modules if name.split('.')[0] == 'train'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == []


# ── held-out rows for evaluation (data.eval_split, data.eval_path) ─────────────────────
TREES = REPO / "data" / "samples" / "oasst_trees_sample.jsonl"
EOT_ID = 128009


def data_config(tmp_path, **settings):
    from data.config import DataConfig

    defaults = {
        "name": "test",
        "path": str(SAMPLE),
        "format": "messages",
        "num_proc": 1,
        "cache_dir": str(tmp_path),
    }
    return DataConfig(**{**defaults, **settings})


def first_turns(dataset) -> set[tuple[int, ...]]:
    """Each row's tokens up to the end of its first user turn (after the template's system turn): the root
    prompt, shared by a tree's threads."""
    return {tuple(ids[: ids.index(EOT_ID, ids.index(EOT_ID) + 1) + 1]) for ids in dataset["input_ids"]}


def test_a_held_out_tree_is_held_out_whole_and_the_split_follows_the_seed(tmp_path, tokenizer):
    """Every root-to-leaf thread of the sample's trees (threads=all; 4 of its 5 are kept): 2 trees go to
    evaluation, each with all its threads, none of which is trained on; the same seed picks the same trees."""
    from data import prepare_from_config

    config = data_config(tmp_path, path=str(TREES), format="oasst_trees", threads="all", eval_split=2)
    train, evaluated, summary = prepare_from_config(config, tokenizer, max_length=2048, seed=1)
    everything, _ = prepare_dataset(
        TREES, "oasst_trees", tokenizer, max_length=2048, threads="all", cache_dir=tmp_path
    )
    assert len(first_turns(everything)) == 4 and len(everything) > 4  # several threads per tree
    assert len(first_turns(evaluated)) == 2 and not first_turns(evaluated) & first_turns(train)
    assert len(train) + len(evaluated) == len(everything)
    assert f"held out for evaluation: {len(evaluated)} of {len(everything)} rows, 2 of 4 groups" in str(
        summary
    )
    assert train.column_names == evaluated.column_names == ["input_ids", "assistant_masks"]
    again = prepare_from_config(config, tokenizer, max_length=2048, seed=1)[1]
    assert again["input_ids"] == evaluated["input_ids"]  # from the cache, the same split
    others = [
        first_turns(prepare_from_config(config, tokenizer, max_length=2048, seed=s)[1]) for s in range(2, 6)
    ]
    assert any(turns != first_turns(evaluated) for turns in others)  # the seed chooses


def test_a_fraction_of_flat_records_and_an_eval_file_of_its_own(tmp_path, tokenizer):
    from data import prepare_from_config

    train, evaluated, _ = prepare_from_config(
        data_config(tmp_path, eval_split=0.05), tokenizer, max_length=512
    )
    assert (len(train), len(evaluated)) == (120, 6)  # 5% of the 126 sample conversations
    guanaco = REPO / "data" / "samples" / "guanaco_sample.jsonl"
    config = data_config(tmp_path, eval_path=str(guanaco), eval_format="guanaco")
    train, evaluated, summary = prepare_from_config(config, tokenizer, max_length=512)
    assert (len(train), len(evaluated)) == (126, 11)  # all of the training file; the other file to evaluate
    assert f"evaluation: {guanaco}, 11 rows" in str(summary)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eval_split": 126}, "data.eval_split=126 holds out 126 of the 126 conversation groups of"),
        ({"eval_split": 1.5}, "data.eval_split=1.5: give a fraction between 0 and 1 (0.05) or a whole count"),
        ({"eval_split": 0.1, "eval_path": str(SAMPLE)}, "data.eval_split and data.eval_path are both set"),
    ],
)
def test_an_eval_split_that_cannot_work_is_refused(tmp_path, tokenizer, settings, message):
    from data import DataError, prepare_from_config

    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        prepare_from_config(data_config(tmp_path, **settings), tokenizer, max_length=512)


# ── a source of any size streams: read and encoded through Arrow files, never held in lists ──────
def generated_source(path, count: int) -> None:
    """``count`` different conversations of varied length made from the sample's, a bad line among them and
    a long prompt every 50."""
    pool = load_conversations(SAMPLE, "messages").conversations
    with path.open("w") as file:
        for index in range(count):
            chat = [dict(message) for message in pool[index % len(pool)]]
            chat[-1]["content"] = " ".join([chat[-1]["content"]] * (1 + index % 4))
            first = next(message for message in chat if message["role"] == "user")
            first["content"] += f" ({index // 7})"  # every 7 in a row open alike: one held-out group
            if index % 50 == 1:  # too long a prompt: nothing left to learn within a max_length of 300
                first["content"] = "word " * 400 + first["content"]
            file.write(json.dumps({"messages": chat}) + "\n" + ("{broken\n" if index == count // 2 else ""))


def test_a_streamed_source_gives_the_rows_and_summary_of_one_read_whole(tokenizer, tmp_path, monkeypatch):
    from data.held_out import group_of

    source = tmp_path / "chats.jsonl"
    generated_source(source, 3000)
    monkeypatch.setattr("data.rows.WRITE_BATCH", 700)  # several batches written
    streamed, summary = prepare_dataset(
        source, "messages", tokenizer, max_length=300, cache_dir=tmp_path / "c", with_groups=True
    )
    read = load_conversations(source, "messages")
    whole, expected = encode_conversations(
        read.conversations, tokenizer, max_length=300, groups=[group_of(c) for c in read.conversations]
    )
    assert streamed.column_names == whole.column_names == ["input_ids", "assistant_masks", "group"]
    for column in whole.column_names:
        assert streamed[column] == whole[column]
    assert summary.truncated > 0 and 0 < summary.conversations < 3000
    assert summary.dropped == {"malformed JSON": 1, **expected.dropped}
    for name in ("conversations", "tokens", "trainable_tokens", "truncated", "length_histogram"):
        assert getattr(summary, name) == getattr(expected, name)
    assert [p.name for p in entries(tmp_path / "c")[0].iterdir() if p.is_dir()] == []  # no work files left


PEAK_RSS = """
import json, re, sys, threading, time
from pathlib import Path
import data.rows
from data import load_tokenizer, prepare_dataset
data.rows.WRITE_BATCH = 250  # so that the small sources here stream through several batches
tokenizer = load_tokenizer()
def anonymous():  # not VmRSS: that counts the pages of memory-mapped Arrow files read, which are page cache
    return int(re.search(r"RssAnon:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
before, peak, done = anonymous(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.01)
sampler = threading.Thread(target=sample)
sampler.start()
prepare_dataset(sys.argv[1], "messages", tokenizer, max_length=2048, cache_dir=sys.argv[2])
done.set()
sampler.join()
print(json.dumps(peak[0] - before))
"""


@pytest.mark.slow
def test_the_memory_of_preparing_does_not_grow_with_the_source(tmp_path):
    """Peak anonymous memory gained while preparing 2,000 conversations and 8,000 (a fresh process each):
    reading them all into lists grew ~16 MB per 1,000 (~95 MB more for the larger one); streamed, it
    barely moves."""
    grown = {}
    for count in (2000, 8000):
        source = tmp_path / f"chats-{count}.jsonl"
        generated_source(source, count)
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(source), str(tmp_path / f"cache-{count}")],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        grown[count] = json.loads(result.stdout.splitlines()[-1])
    assert grown[8000] < grown[2000] + 30 * 2**20, grown  # 4x the rows, not 4x (nor +48 MB of) the memory
