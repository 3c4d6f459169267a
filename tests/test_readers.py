"""Readers: the messages/ShareGPT JSONL shapes, and bad records counted, named, or raised in strict mode."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import SAMPLE

from data import DataError, load_conversations

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_reads_the_shipped_sample():
    loaded = load_conversations(SAMPLE, "messages", strict=True)
    assert len(loaded.conversations) >= 100
    assert not loaded.dropped
    assert all(conversation[-1]["role"] == "assistant" for conversation in loaded.conversations)


def test_sharegpt_and_gzip(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    path = tmp_path / "chats.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write(json.dumps(record) + "\n" + json.dumps(GOOD) + "\n")
    loaded = load_conversations(path, "messages")
    assert loaded.conversations == [GOOD["messages"], GOOD["messages"]]


def test_bad_records_are_counted_and_named(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl",
        [
            json.dumps(GOOD).encode(),
            b"{not json",
            json.dumps({"text": "no messages"}).encode(),
            json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(),
            b'{"messages": [{"role": "user", "content": "\xff"}]}',
            json.dumps(GOOD).encode(),
        ],
    )
    loaded = load_conversations(path, "messages")
    assert len(loaded.conversations) == 2
    assert dict(loaded.dropped) == {
        "malformed JSON": 1,
        "no messages list": 1,
        "invalid message": 1,
        "no assistant turn": 1,
        "not UTF-8": 1,
    }
    assert loaded.examples[0].startswith(f"{path}:2: malformed JSON")
    assert any(e.startswith(f"{path}:4: message 0: unknown role 'wizard'") for e in loaded.examples)
    assert "5 dropped" in loaded.summary()


def test_strict_raises_on_the_first_bad_record_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD).encode(), b"{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON .*data.strict=false"):
        load_conversations(path, "messages", strict=True)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file; set data.path"):
        load_conversations(tmp_path / "absent.jsonl", "messages")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_conversations(SAMPLE, "csv")
