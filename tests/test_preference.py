"""Preference data: prompt/chosen/rejected and KTO readers, pairs mined from OpenAssistant trees,
token ids for TRL's DPO/KTO collators (prompt + completion == encode_chat, token for token), prepare."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

import data.prepare as prepare_module
from data import (
    DataError,
    encode_chat,
    encode_preference,
    encode_preference_records,
    encode_preferences,
    load_preferences,
    prepare_preferences,
    unpaired,
)
from data.cache import SOURCE_HASHES

SAMPLES = REPO / "data" / "samples"
PAIRS = SAMPLES / "preference_sample.jsonl"
KTO = SAMPLES / "kto_sample.jsonl"
OASST_MESSAGES = SAMPLES / "oasst_messages_sample.jsonl"
OASST_TREES = SAMPLES / "oasst_trees_sample.jsonl"
STRICT_FIX = "data.strict=false"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def write_lines(path, records: list) -> str:
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ── pairs mined from OpenAssistant trees ──────────────────────────────────────────────
def sample_text(start: str) -> str:
    lines = OASST_MESSAGES.read_text(encoding="utf-8").splitlines()
    [text] = [json.loads(line)["text"] for line in lines if json.loads(line)["text"].startswith(start)]
    return text


def pair(prompt: list[tuple[str, str]], chosen: str, rejected: str) -> dict:
    """A pair from the sample: each message named by (role, start of its text)."""
    return {
        "prompt": [{"role": role, "content": sample_text(start)} for role, start in prompt],
        "chosen": [assistant(sample_text(chosen))],
        "rejected": [assistant(sample_text(rejected))],
    }


LISTS = ("user", "What is the difference between a list and a tuple")
# Worked out by hand from oasst_messages_sample.jsonl (line: rank):
SAMPLE_PAIRS = [
    # 2: 0 vs 7: 1; the deleted rank-2 reply (8) and the unranked one (10) make no pair
    pair([LISTS], "The main difference is mutability", "Lists are mutable and tuples are immutable."),
    # 5: 0 vs 4: 1, under the follow-up question; the prompt is the path to it
    pair(
        [LISTS, ("assistant", "The main difference is mutability"), ("user", "Is a tuple faster")],
        "A little. You can measure it",
        "Slightly, but rarely",
    ),
    # 13: 0 vs 12: 1; the failed-review reply (16) is pruned
    pair([("user", "Wie koche ich Spaghetti")], "Ein paar einfache Regeln helfen", "Nimm einen großen Topf"),
    pair(
        [("user", "¿Cuál es la capital de Australia?")], "La capital de Australia es Canberra.", "Canberra."
    ),
    # the haiku tree has no reply; in the French tree only one of two replies is ranked: no pair
]


@pytest.mark.parametrize(
    ("path", "format"), [(OASST_MESSAGES, "oasst_messages"), (OASST_TREES, "oasst_trees")]
)
def test_pairs_mined_from_the_oasst_sample_are_exactly_these(path, format):
    loaded = load_preferences(path, format, strict=True)  # nothing left out by design is an error
    assert loaded.records == SAMPLE_PAIRS
    assert dict(loaded.dropped) == {
        "deleted": 1,
        "failed review": 1,
        "unranked reply": 2,
        "no ranked pair": 2,
    }
    assert loaded.summary().startswith(f"{path}: 4 pairs, 6 dropped")


def test_unranked_reply_and_tree_without_pair_are_named():
    examples = load_preferences(OASST_MESSAGES, "oasst_messages").examples
    unranked = json.loads(OASST_MESSAGES.read_text().splitlines()[9])["message_id"]
    assert (
        f"{OASST_MESSAGES}:10: message {unranked} has no rank, so it is in no pair with its 2 siblings"
        in (examples)
    )
    assert any(
        e.startswith(f"{OASST_MESSAGES}:21: tree ") and "no prompt has two ranked" in e for e in examples
    )


def oasst(message_id, parent_id, role, text, **fields) -> dict:
    record = {"message_id": message_id, "parent_id": parent_id, "message_tree_id": "t", "role": role}
    return {**record, "text": text, "lang": "en", "deleted": False, **fields}


RANKED_TREE = [
    oasst("q", None, "prompter", "Question?"),
    oasst("r2", "q", "assistant", "rank 2", rank=2),
    oasst("r0", "q", "assistant", "rank 0", rank=0),
    oasst("none", "q", "assistant", "unranked"),
    oasst("r3", "q", "assistant", "rank 3", rank=3),
    oasst("gone", "q", "assistant", "deleted rank 1", rank=1, deleted=True),
    oasst("r1", "q", "assistant", "rank 1", rank=1),
    oasst("r1b", "q", "assistant", "also rank 1", rank=1),
    oasst("f", "r2", "prompter", "Follow-up?"),  # below the rank-2 reply, not the best one
    oasst("f1", "f", "assistant", "follow-up rank 1", rank=1),
    oasst("f0", "f", "assistant", "follow-up rank 0", rank=0),
]
FOLLOW_UP = {
    "prompt": [user("Question?"), assistant("rank 2"), user("Follow-up?")],
    "chosen": [assistant("follow-up rank 0")],
    "rejected": [assistant("follow-up rank 1")],
}


def mined(tmp_path, **options) -> list[tuple[str, str]]:
    path = write_lines(tmp_path / "ranked.messages.jsonl", RANKED_TREE)
    loaded = load_preferences(path, "oasst_messages", **options)
    assert loaded.dropped["deleted"] == 1 and loaded.dropped["unranked reply"] == 1
    top = [
        (p["chosen"][0]["content"], p["rejected"][0]["content"])
        for p in loaded.records
        if len(p["prompt"]) == 1
    ]
    below = [p for p in loaded.records if len(p["prompt"]) > 1]
    assert all(p["prompt"] == [user("Question?")] for p in loaded.records if len(p["prompt"]) == 1)
    return top, below


def test_pairs_come_widest_rank_gap_first_and_equal_ranks_never_pair(tmp_path):
    top, below = mined(tmp_path)
    assert top == [
        ("rank 0", "rank 3"),  # gap 3: the best against the worst
        ("rank 0", "rank 2"),  # gap 2, the better chosen reply first
        ("rank 1", "rank 3"),
        ("also rank 1", "rank 3"),
        ("rank 0", "rank 1"),  # gap 1
        ("rank 0", "also rank 1"),
        ("rank 1", "rank 2"),
        ("also rank 1", "rank 2"),
        ("rank 2", "rank 3"),
    ]
    assert below == [FOLLOW_UP]  # the prompt is the actual path: through the rank-2 reply


def test_pairs_per_prompt_and_min_rank_gap(tmp_path):
    assert mined(tmp_path, pairs_per_prompt=1) == ([("rank 0", "rank 3")], [FOLLOW_UP])
    assert mined(tmp_path, pairs_per_prompt=2)[0] == [("rank 0", "rank 3"), ("rank 0", "rank 2")]
    gap_two = mined(tmp_path, min_rank_gap=2)
    assert gap_two == (
        [("rank 0", "rank 3"), ("rank 0", "rank 2"), ("rank 1", "rank 3"), ("also rank 1", "rank 3")],
        [],
    )
    assert mined(tmp_path, min_rank_gap=3, pairs_per_prompt=5) == ([("rank 0", "rank 3")], [])


def test_lang_keeps_trees_by_their_first_prompt():
    loaded = load_preferences(OASST_TREES, "oasst_trees", lang=["de"])
    assert loaded.records == [SAMPLE_PAIRS[2]]
    assert loaded.dropped["language filtered"] == 4


@pytest.mark.parametrize(
    ("format", "options", "message"),
    [
        ("oasst_messages", {"pairs_per_prompt": 0}, "data.pairs_per_prompt: 0 is not a number of pairs"),
        ("oasst_messages", {"min_rank_gap": 0}, r"data.min_rank_gap: 0 must be a whole number, at least 1"),
        ("oasst_messages", {"lang": []}, "data.lang is empty"),
        (
            "preference",
            {"lang": ["en"]},
            "data.lang applies to OpenAssistant trees .* not format 'preference'",
        ),
        ("kto", {"min_rank_gap": 2}, "data.min_rank_gap applies to OpenAssistant trees"),
        ("messages", {}, "unknown preference data format 'messages'"),
    ],
)
def test_settings_are_checked_before_reading(format, options, message):
    with pytest.raises(DataError, match=message):
        load_preferences(OASST_MESSAGES, format, **options)


def test_strict_tree_errors_raise_with_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "orphan.jsonl", RANKED_TREE + [oasst("o", "nowhere", "assistant", "Orphan.")]
    )
    assert load_preferences(path, "oasst_messages").dropped["missing parent"] == 1
    with pytest.raises(DataError, match=rf"{path}:12: message o: its parent nowhere .*{STRICT_FIX}"):
        load_preferences(path, "oasst_messages", strict=True)


# ── prompt/chosen/rejected and KTO files ──────────────────────────────────────────────
def test_shipped_samples_read_cleanly():
    pairs = load_preferences(PAIRS, "preference", strict=True)
    assert 30 <= len(pairs.records) <= 60 and not pairs.dropped
    assert any(record["prompt"][0]["role"] == "system" for record in pairs.records)
    assert any(len(record["prompt"]) >= 3 for record in pairs.records)  # multi-turn prefixes
    kto = load_preferences(KTO, "kto", strict=True)
    assert not kto.dropped and {record["label"] for record in kto.records} == {True, False}
    for path in (PAIRS, KTO, OASST_MESSAGES):
        assert path.stat().st_size < 60_000


def test_preferences_iterate_and_keep_their_summary():
    kto = load_preferences(KTO, "kto")
    assert [record for record in kto] == kto.records and all("label" in record for record in kto)
    assert kto.summary().startswith(f"{KTO}: {len(kto.records)} completions (")


def test_strings_implicit_prompts_and_messages_read_alike(tmp_path):
    as_messages = {
        "prompt": [user("Hi?")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
    }
    records = [
        as_messages,
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [user("Hi?")], "chosen": "Hello!", "rejected": "Go away."},
        {"chosen": [user("Hi?"), assistant("Hello!")], "rejected": [user("Hi?"), assistant("Go away.")]},
    ]
    path = write_lines(tmp_path / "pairs.jsonl", records)
    assert load_preferences(path, strict=True).records == [as_messages] * 4
    path = write_lines(tmp_path / "kto.jsonl", [{"prompt": "Hi?", "completion": "Hello!", "label": True}])
    assert load_preferences(path, "kto", strict=True).records == [
        {"prompt": [user("Hi?")], "completion": [assistant("Hello!")], "label": True}
    ]


GOOD = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}


def test_bad_records_are_counted_and_named(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl",
        [
            GOOD,
            b"{not json",
            {"prompt": "Hi?", "chosen": "Hello!"},
            {"prompt": "Hi?", "chosen": [assistant("a"), assistant("b")], "rejected": "no"},
            {"prompt": [user("Hi?"), assistant("Hello!")], "chosen": "x", "rejected": "y"},
            {"prompt": [{"role": "wizard", "content": "Hi?"}], "chosen": "x", "rejected": "y"},
            {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            {"prompt": "Hi?", "chosen": "   ", "rejected": "y"},
            ["not", "an", "object"],
            {"prompt": 42, "chosen": "x", "rejected": "y"},
            GOOD,
        ],
    )
    loaded = load_preferences(path)
    good = {"prompt": [user("Hi?")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    assert loaded.records == [good, good]
    assert dict(loaded.dropped) == {
        "malformed JSON": 1,
        "missing field": 1,
        "invalid completion": 1,
        "prompt ends without a question": 1,
        "invalid message": 1,
        "identical chosen and rejected": 1,
        "empty text": 1,
        "not an object": 1,
        "invalid prompt": 1,
    }
    assert loaded.examples == [
        f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes, column 2)",
        f"{path}:3: no 'rejected' field in the record",
        f"{path}:4: 'chosen' must be a string or a list of one assistant message, got 2 messages",
        f"{path}:5: 'prompt' ends on a 'assistant' turn; it must end on the user (or tool) turn that the "
        "completions answer",
        f"{path}:6: prompt: message 0: unknown role 'wizard'; expected one of system, user, assistant, "
        "ipython, tool",
        f"{path}:7: 'chosen' and 'rejected' are the same reply, so neither is preferred",
        f"{path}:8: 'chosen' has empty text",
        f"{path}:9: expected a JSON object with chosen, rejected, got list",
        f"{path}:10: 'prompt' must be a string or a list of messages, got int",
    ]
    assert loaded.summary().startswith(f"{path}: 2 pairs, 9 dropped")
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON .*{STRICT_FIX}"):
        load_preferences(path, strict=True)
    path = write_lines(tmp_path / "missing.jsonl", [GOOD, {"prompt": "Hi?", "chosen": "Hello!"}])
    with pytest.raises(DataError, match=rf"^{path}:2: no 'rejected' field in the record \(fix the record"):
        load_preferences(path, strict=True)


def test_bad_kto_records_are_counted_and_named(tmp_path):
    good = {"prompt": "Hi?", "completion": "Hello!", "label": False}
    path = write_lines(
        tmp_path / "kto.jsonl", [good, {**good, "label": 1}, {**good, "completion": [user("x")]}]
    )
    loaded = load_preferences(path, "kto")
    assert len(loaded.records) == 1 and loaded.summary().startswith(f"{path}: 1 completions (0 desirable)")
    assert loaded.examples == [
        f"{path}:2: 'label' must be true or false, got 1",
        f"{path}:3: 'completion' must be a string or a list of one assistant message, got a 'user' message",
    ]
    with pytest.raises(DataError, match=rf"{path}:2: 'label' must be true or false, got 1 \(.*{STRICT_FIX}"):
        load_preferences(path, "kto", strict=True)


@pytest.mark.parametrize(
    ("first", "format", "message"),
    [
        (
            {"prompt": "Hi?", "chosen": "Hello!"},
            "preference",
            "no 'rejected' field; format 'preference' needs prompt, chosen, rejected in every record, "
            "and this one has prompt, chosen; rename the fields",
        ),
        (
            {"prompt": "Hi?", "completion": "Hello!", "label": True},
            "preference",
            "no 'chosen' or 'rejected' field; .* it looks like KTO data: set data.format=kto",
        ),
        (
            GOOD,
            "kto",
            "no 'completion' or 'label' field; .* it looks like preference pairs: set data.format=preference",
        ),
        ({"messages": [user("Hi?")]}, "kto", "no 'prompt' or 'completion' or 'label' field; .* chat data"),
        (
            {"chosen": "Hello!", "rejected": "Bye."},
            "preference",
            "no 'prompt' field; .* add a 'prompt', or make",
        ),
    ],
)
def test_a_dataset_of_the_wrong_shape_fails_at_its_first_record(tmp_path, first, format, message):
    path = write_lines(tmp_path / "shape.jsonl", [b"", first, GOOD])
    with pytest.raises(DataError, match=rf"^{path}:2: {message}"):
        load_preferences(path, format)  # not strict: a wrong format is no bad record to skip


# ── token ids: exactly our encoder's ──────────────────────────────────────────────────
def assert_exact(record, row, tokenizer):
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt_ids = row["prompt_ids"]
    assert prompt_ids[-len(header) :] == header
    template = tokenizer.apply_chat_template(
        record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert prompt_ids == template["input_ids"]  # the official template's generation prompt
    for name in ("chosen", "rejected", "completion"):
        if name in record:
            full = encode_chat(record["prompt"] + record[name], tokenizer)["input_ids"]
            assert full[: len(prompt_ids)] == prompt_ids  # one prompt prefix, token for token
            assert prompt_ids + row[f"{name}_ids"] == full
            assert row[f"{name}_ids"][-1] == eot and eot not in row[f"{name}_ids"][:-1]


def test_prompt_plus_completion_is_encode_chat_token_for_token(tokenizer):
    records = load_preferences(PAIRS, "preference").records + SAMPLE_PAIRS
    rows = encode_preferences(records, tokenizer)
    assert set(rows[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    for record, row in zip(records, rows, strict=True):
        assert_exact(record, row, tokenizer)
    kto = load_preferences(KTO, "kto").records
    for record, row in zip(kto, encode_preferences(kto, tokenizer), strict=True):
        assert row["label"] is record["label"]
        assert_exact(record, row, tokenizer)


def test_trimmed_and_special_looking_replies_split_exactly(tokenizer):
    # Replies are trimmed as the template trims them, and "<|eot_id|>" in data stays text.
    record = {
        "prompt": [user("Say hi")],
        "chosen": [assistant("  \n\nhi")],
        "rejected": [assistant("<|eot_id|>")],
    }
    row = encode_preference(record, tokenizer)
    assert_exact(record, row, tokenizer)
    assert tokenizer.decode(row["rejected_ids"]) == "<|eot_id|><|eot_id|>"  # data text, then the real one


def test_trl_collators_train_on_exactly_these_tokens(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    records = load_preferences(PAIRS, "preference").records[:2]
    rows = encode_preferences(records, tokenizer)
    batch = DataCollatorForPreference(pad_token_id=0)(rows)
    for index, (record, row) in enumerate(zip(records, rows, strict=True)):
        for half, name in enumerate(("chosen", "rejected")):
            ids = encode_chat(record["prompt"] + record[name], tokenizer)["input_ids"]
            line = half * len(rows) + index
            assert batch["input_ids"][line][: len(ids)].tolist() == ids
            mask = batch["completion_mask"][line][: len(ids)].tolist()
            assert mask == [0] * len(row["prompt_ids"]) + [1] * len(row[f"{name}_ids"])
    kto = load_preferences(KTO, "kto").records[:2]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(encode_preferences(kto, tokenizer))
    ids = encode_chat(kto[0]["prompt"] + kto[0]["completion"], tokenizer)["input_ids"]
    assert batch["input_ids"][0][: len(ids)].tolist() == ids
    assert batch["label"].tolist() == [record["label"] for record in kto]


# ── prepare: max_length, unpairing for KTO, the cache ─────────────────────────────────
def rows_of(records, tokenizer, objective="dpo", **options):
    dataset, summary = encode_preference_records(records, tokenizer, objective=objective, **options)
    return dataset.to_list(), summary


def test_max_length_cuts_completions_and_drops_what_cannot_fit(tokenizer):
    short = {"prompt": [user("Hi?")], "chosen": [assistant("Hello!")], "rejected": [assistant("Bye.")]}
    long_reply = {**short, "chosen": [assistant("word " * 300)]}
    long_prompt = {**short, "prompt": [user("word " * 300)]}
    same_start = {
        **short,
        "chosen": [assistant("word " * 300 + "yes")],
        "rejected": [assistant("word " * 300)],
    }
    records = [short, long_reply, long_prompt, same_start]
    full = encode_preference(long_reply, tokenizer)

    rows, summary = rows_of(records, tokenizer, max_length=128)
    assert rows[0] == encode_preference(short, tokenizer)
    assert rows[1]["prompt_ids"] == full["prompt_ids"] and rows[1]["rejected_ids"] == full["rejected_ids"]
    assert len(rows[1]["prompt_ids"] + rows[1]["chosen_ids"]) == 128
    assert rows[1]["chosen_ids"] == full["chosen_ids"][: len(rows[1]["chosen_ids"])]
    assert len(rows) == 2 and summary.truncated == 1 and summary.rows == 2
    assert summary.dropped == {
        "prompt fills max_length=128": 1,
        "chosen and rejected identical within max_length=128": 1,
    }
    assert summary.prompt_tokens == sum(len(row["prompt_ids"]) for row in rows)
    assert summary.length_histogram[">128"] == 3

    rows, summary = rows_of(records, tokenizer, max_length=128, overflow="drop")
    assert rows == [encode_preference(short, tokenizer)]
    assert summary.dropped == {"longer than max_length=128": 3} and summary.truncated == 0


def test_kto_rows_and_pairs_unpaired_for_kto(tokenizer, tmp_path):
    kto = load_preferences(KTO, "kto").records
    rows, summary = rows_of(kto, tokenizer, objective="kto", max_length=4096)
    assert rows == encode_preferences(kto, tokenizer)
    assert summary.desirable == 16 and "16 desirable, 14 undesirable" in str(summary)

    path = write_lines(tmp_path / "ranked.messages.jsonl", RANKED_TREE[:5])  # ranks 2, 0, 3 and one unranked
    records = unpaired(load_preferences(path, "oasst_messages")).records
    assert [(r["completion"][0]["content"], r["label"]) for r in records] == [
        ("rank 0", True),
        ("rank 3", False),
    ]
    both = unpaired(load_preferences(path, "oasst_messages"))
    assert both.dropped["labelled both ways"] == 1  # rank 2: chosen against rank 3, rejected against rank 0
    assert both.examples[-1] == f"{path}: the reply 'rank 2' is chosen in one pair, rejected in another"


def test_prepared_dataset_is_cached_and_reused(tokenizer, tmp_path, monkeypatch):
    dataset, summary = prepare_preferences(
        PAIRS, "preference", tokenizer, max_length=1024, cache_dir=tmp_path
    )
    records = load_preferences(PAIRS, "preference").records
    assert dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert dataset.to_list() == encode_preferences(records, tokenizer)
    assert summary.rows == 40 and summary.dropped == {} and summary.path.startswith(str(tmp_path))
    monkeypatch.setattr(
        prepare_module, "load_preferences", lambda *a, **k: pytest.fail("read the source again")
    )
    again, cached = prepare_preferences(PAIRS, "preference", tokenizer, max_length=1024, cache_dir=tmp_path)
    assert again.to_list() == dataset.to_list() and cached == summary
    monkeypatch.undo()

    kto, summary = prepare_preferences(
        OASST_TREES, "oasst_trees", tokenizer, objective="kto", max_length=1024, cache_dir=tmp_path
    )
    assert kto.column_names == ["prompt_ids", "completion_ids", "label"] and summary.rows == 8
    assert summary.dropped["no ranked pair"] == 2
    assert len([p for p in tmp_path.iterdir() if p.name != SOURCE_HASHES]) == 2  # one entry per objective


def test_dpo_on_kto_data_fails_before_reading(tokenizer, tmp_path):
    with pytest.raises(DataError, match="format 'kto' holds single completions .* DPO trains on pairs"):
        prepare_preferences(tmp_path / "absent.jsonl", "kto", tokenizer, max_length=512)
    with pytest.raises(DataError, match="no such file; set data.path"):
        prepare_preferences(tmp_path / "absent.jsonl", "preference", tokenizer, max_length=512)
    with pytest.raises(ValueError, match="unknown objective 'orpo'"):
        prepare_preferences(PAIRS, "preference", tokenizer, objective="orpo", max_length=512)
