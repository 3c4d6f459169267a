"""Readers: messages/ShareGPT, OpenAssistant trees (flat and nested), ChatML and guanaco text;
JSONL, JSON lists, gzip and parquet; bad records counted, named, or raised in strict mode.
(ShareGPT, Alpaca, prompt/completion and tool calling have their own file: test_schemas.)"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE
from omegaconf import OmegaConf

from data import DataError, encode_chat, load_conversations, validate_messages
from data.config import sample_path

SAMPLES = REPO / "data" / "samples"
OASST_MESSAGES = SAMPLES / "oasst_messages_sample.jsonl"
OASST_TREES = SAMPLES / "oasst_trees_sample.jsonl"
OASST_TOP1 = SAMPLES / "oasst_top1_sample.jsonl"
GUANACO = SAMPLES / "guanaco_sample.jsonl"
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def sample_records(path=OASST_MESSAGES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def turns(*pairs: tuple[str, str]) -> list[dict]:
    """Exact messages: each (role, start of text) becomes the one sample message whose text starts so."""
    texts = [record["text"] for record in sample_records()]
    messages = []
    for role, start in pairs:
        [text] = [text for text in texts if text.startswith(start)]
        messages.append({"role": role, "content": text})
    return messages


def message_id(start: str) -> str:
    [found] = [record["message_id"] for record in sample_records() if record["text"].startswith(start)]
    return found


LISTS = ("user", "What is the difference between a list and a tuple")
LISTS_BEST = ("assistant", "The main difference is mutability")
FASTER = ("user", "Is a tuple faster than a list?")
PASTA = ("user", "Wie koche ich Spaghetti")
PASTA_BEST = ("assistant", "Ein paar einfache Regeln helfen")
SALT = ("user", "Wie viel Salz")
SALT_ANSWER = ("assistant", "Als Faustregel")
CANBERRA = ("user", "¿Cuál es la capital de Australia?")
CANBERRA_BEST = ("assistant", "La capital de Australia es Canberra.")
PHOTO = ("user", "Peux-tu m'expliquer")
PHOTO_BEST = ("assistant", "La photosynthèse est le processus")
GREEN = ("user", "Et pourquoi les feuilles")
GREEN_ANSWER = ("assistant", "Parce que la chlorophylle")

BEST_THREADS = [
    turns(
        LISTS, LISTS_BEST, FASTER, ("assistant", "A little. You can measure it")
    ),  # rank 0 comes after rank 1
    turns(PASTA, PASTA_BEST, SALT, SALT_ANSWER),
    turns(CANBERRA, CANBERRA_BEST),  # cut back: the follow-up question was never answered
    turns(PHOTO, PHOTO_BEST, GREEN, GREEN_ANSWER),  # the ranked reply beats the unranked one before it
]
ALL_THREADS = [
    turns(LISTS, LISTS_BEST, FASTER, ("assistant", "Slightly, but rarely")),
    turns(LISTS, LISTS_BEST, FASTER, ("assistant", "A little. You can measure it")),
    turns(LISTS, LISTS_BEST),  # the unanswered "Can you show me how to use a tuple as a dictionary key?"
    turns(LISTS, ("assistant", "Lists are mutable and tuples are immutable.")),
    turns(LISTS, ("assistant", "A list is mutable and a tuple is immutable.")),  # synthetic, unranked
    turns(PASTA, ("assistant", "Nimm einen großen Topf")),
    turns(PASTA, PASTA_BEST, SALT, SALT_ANSWER),
    turns(CANBERRA, CANBERRA_BEST),
    turns(CANBERRA, ("assistant", "Canberra.")),
    turns(PHOTO, ("assistant", "C'est la façon dont")),
    turns(PHOTO, PHOTO_BEST, GREEN, GREEN_ANSWER),
]
LEFT_OUT_BY_DESIGN = {"deleted": 1, "failed review": 1, "no assistant turn": 1}


# ── messages / ShareGPT ──────────────────────────────────────────────────────────────
def test_reads_the_shipped_sample():
    loaded = load_conversations(SAMPLE, "messages", strict=True)
    assert len(loaded.conversations) >= 100
    assert not loaded.dropped
    assert all(conversation[-1]["role"] == "assistant" for conversation in loaded.conversations)


def test_conversations_iterate_and_keep_their_summary(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD).encode(), b"{broken"])
    loaded = load_conversations(path, "messages")
    assert [conversation for conversation in loaded] == [GOOD["messages"]]
    assert loaded.summary().startswith(f"{path}: 1 conversations, 1 dropped")


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


def test_messages_are_cut_back_to_the_last_assistant_turn(tmp_path):
    unanswered = GOOD["messages"] + [{"role": "user", "content": "And then?"}]
    path = write_lines(tmp_path / "chats.jsonl", [json.dumps({"messages": unanswered}).encode()])
    assert load_conversations(path, "messages", strict=True).conversations == [GOOD["messages"]]


def test_strict_raises_on_the_first_bad_record_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD).encode(), b"{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON .*data.strict=false"):
        load_conversations(path, "messages", strict=True)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file; set data.path"):
        load_conversations(tmp_path / "absent.jsonl", "messages")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_conversations(SAMPLE, "csv")


@pytest.mark.parametrize(
    ("format", "options", "message"),
    [
        ("oasst_messages", {"threads": "longest"}, "data.threads: 'longest' is not one of best, all"),
        ("messages", {"lang": ["en"]}, "data.lang applies to OpenAssistant trees .* not format 'messages'"),
        ("guanaco", {"threads": "all"}, "data.threads=all applies to OpenAssistant trees"),
        ("oasst_messages", {"lang": []}, "data.lang is empty, which keeps nothing; use null"),
    ],
)
def test_tree_settings_are_checked_before_reading(format, options, message):
    with pytest.raises(DataError, match=message):
        load_conversations(OASST_MESSAGES, format, **options)


# ── OpenAssistant trees ──────────────────────────────────────────────────────────────
def test_oasst_best_thread_of_each_tree():
    loaded = load_conversations(OASST_MESSAGES, "oasst_messages", strict=True)
    assert loaded.conversations == BEST_THREADS
    assert dict(loaded.dropped) == LEFT_OUT_BY_DESIGN


def test_oasst_all_threads_are_every_root_to_leaf_path():
    loaded = load_conversations(OASST_MESSAGES, "oasst_messages", threads="all", strict=True)
    assert len(loaded.conversations) == 11
    assert loaded.conversations == ALL_THREADS
    assert dict(loaded.dropped) == LEFT_OUT_BY_DESIGN


def test_deleted_and_failed_review_subtrees_are_left_out_and_counted():
    loaded = load_conversations(OASST_MESSAGES, "oasst_messages", threads="all")
    contents = {message["content"] for thread in loaded.conversations for message in thread}
    assert not any(text.startswith("idk just use whatever") for text in contents)  # deleted
    assert not any(text.startswith("That is not very helpful") for text in contents)  # its reply
    assert not any("Ketchup" in text for text in contents)  # failed review
    assert loaded.examples == [
        f"{OASST_MESSAGES}:8: message {message_id('idk just')} is deleted "
        "(left out with the 1 message below it)",
        f"{OASST_MESSAGES}:16: message {message_id('Einfach viel Ketchup')} failed review",
        f"{OASST_MESSAGES}:21: tree {message_id('Write a haiku')}: no assistant reply to its prompt",
    ]


def test_threads_end_on_an_assistant_turn_and_validate():
    for threads in ("best", "all"):
        for conversation in load_conversations(
            OASST_MESSAGES, "oasst_messages", threads=threads
        ).conversations:
            validate_messages(conversation)
            assert conversation[-1]["role"] == "assistant"
            assert [m["role"] for m in conversation] == ["user", "assistant"] * (len(conversation) // 2)


def test_lang_keeps_trees_by_their_first_prompt():
    loaded = load_conversations(OASST_MESSAGES, "oasst_messages", lang=["de", "es"])
    assert loaded.conversations == [BEST_THREADS[1], BEST_THREADS[2]]
    assert dict(loaded.dropped) == {"language filtered": 3, "failed review": 1}
    assert loaded.examples[0].startswith(f"{OASST_MESSAGES}:1: tree ")
    assert loaded.examples[0].endswith("language 'en' is not in data.lang")
    assert load_conversations(OASST_TREES, "oasst_trees", lang="fr").conversations == [BEST_THREADS[3]]


@pytest.mark.parametrize("threads", ["best", "all"])
def test_flat_and_nested_exports_give_the_same_conversations(threads):
    flat = load_conversations(OASST_MESSAGES, "oasst_messages", threads=threads, strict=True)
    nested = load_conversations(OASST_TREES, "oasst_trees", threads=threads, strict=True)
    assert nested.conversations == flat.conversations
    assert nested.dropped == flat.dropped
    assert nested.examples[0].startswith(f"{OASST_TREES}:1: message ")  # the tree's line


def oasst(message_id, parent_id, role, text, **fields) -> bytes:
    record = {"message_id": message_id, "parent_id": parent_id, "message_tree_id": "t", "role": role}
    return json.dumps({**record, "text": text, "lang": "en", "deleted": False, **fields}).encode()


def test_best_reply_prefers_lowest_rank_then_ranked_then_file_order(tmp_path):
    path = write_lines(
        tmp_path / "ranks.jsonl",
        [
            oasst("q1", None, "prompter", "Tie?"),
            oasst("a1", "q1", "assistant", "first of two rank 1", rank=1),
            oasst("a2", "q1", "assistant", "second of two rank 1", rank=1),
            oasst("q2", None, "prompter", "Unranked?"),
            oasst("b1", "q2", "assistant", "first unranked"),
            oasst("b2", "q2", "assistant", "second unranked", rank=None),
            oasst("q3", None, "prompter", "Ranked?"),
            oasst("c1", "q3", "assistant", "unranked"),
            oasst("c2", "q3", "assistant", "rank 3", rank=3),
            oasst("c3", "q3", "assistant", "rank 2", rank=2),
        ],
    )
    loaded = load_conversations(path, "oasst_messages", strict=True)
    assert [conversation[1]["content"] for conversation in loaded.conversations] == [
        "first of two rank 1",
        "first unranked",
        "rank 2",
    ]


def test_bad_oasst_messages_are_counted_and_named(tmp_path):
    path = write_lines(
        tmp_path / "bad.messages.jsonl",
        [
            oasst("r1", None, "prompter", "Hello?"),
            oasst("a1", "r1", "assistant", "Hi there."),
            b'{"message_id": "broken", ',
            b'{"message_id": "bad\xff", "role": "prompter"}',
            oasst("o1", "nowhere", "assistant", "Orphan reply."),
            oasst("o2", "o1", "prompter", "Reply to the orphan."),
            oasst("r2", None, "prompter", "   "),
            oasst("a2", "r2", "assistant", "An answer to nothing."),
            oasst("r3", None, "moderator", "Who am I?"),
            json.dumps({"text": "no id", "role": "prompter"}).encode(),
            oasst("a1", "r1", "assistant", "Hi again, same id."),
        ],
    )
    loaded = load_conversations(path, "oasst_messages")
    assert loaded.conversations == [
        [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]
    ]
    assert dict(loaded.dropped) == {
        "malformed JSON": 1,
        "not UTF-8": 1,
        "invalid message": 1,
        "duplicate message id": 1,
        "missing parent": 1,
        "empty text": 1,
        "unknown role": 1,
    }
    assert sorted(loaded.examples) == sorted(
        [
            f"{path}:3: malformed JSON (Expecting property name enclosed in double quotes, column 26)",
            f"{path}:4: not valid UTF-8 (invalid start byte at byte 19)",
            f"{path}:10: no 'message_id' string in the message",
            f"{path}:11: message a1 appeared before; that one is kept",
            f"{path}:5: message o1: its parent nowhere is not in the file "
            "(left out with the 1 message below it)",
            f"{path}:7: message r2 has empty text (left out with the 1 message below it)",
            f"{path}:9: message r3: unknown role 'moderator'; expected prompter or assistant",
        ]
    )


def test_strict_oasst_raises_with_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "orphan.jsonl",
        [oasst("r1", None, "prompter", "Hello?"), oasst("o1", "nowhere", "assistant", "Orphan.")],
    )
    with pytest.raises(
        DataError, match=rf"{path}:2: message o1: its parent nowhere is not in .*data.strict=false"
    ):
        load_conversations(path, "oasst_messages", strict=True)


def test_bad_oasst_trees_are_counted_and_named(tmp_path):
    good = {"message_tree_id": "t1", "prompt": json.loads(oasst("r1", None, "prompter", "Hello?"))}
    good["prompt"]["replies"] = [json.loads(oasst("a1", "r1", "assistant", "Hi."))]
    bot = {"message_tree_id": "t2", "prompt": json.loads(oasst("r2", None, "prompter", "Who is there?"))}
    bot["prompt"]["replies"] = [json.loads(oasst("a2", "r2", "bot", "Beep."))]
    path = write_lines(
        tmp_path / "bad.trees.jsonl",
        [json.dumps(good).encode(), json.dumps({"message_tree_id": "t0"}).encode(), json.dumps(bot).encode()],
    )
    loaded = load_conversations(path, "oasst_trees")
    assert loaded.conversations == [
        [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]
    ]
    assert dict(loaded.dropped) == {"invalid tree": 1, "unknown role": 1, "no assistant turn": 1}
    assert f"{path}:2: no 'prompt' message object in the tree record" in loaded.examples
    assert f"{path}:3: message a2: unknown role 'bot'; expected prompter or assistant" in loaded.examples
    with pytest.raises(DataError, match=rf"{path}:2: no 'prompt' .*data.strict=false"):
        load_conversations(path, "oasst_trees", strict=True)


# ── ChatML (oasst_top1) and guanaco text ─────────────────────────────────────────────
def test_chatml_parses_exactly():
    loaded = load_conversations(OASST_TOP1, "oasst_top1", strict=True)
    assert len(loaded.conversations) == 11 and not loaded.dropped
    assert loaded.conversations[2] == [
        {"role": "system", "content": "You are a concise assistant. Answer in at most two sentences."},
        {"role": "user", "content": "How many bits are in a byte?"},
        {
            "role": "assistant",
            "content": "A byte has 8 bits on virtually every modern computer. Historically some machines "
            'used other sizes, which is why standards documents sometimes say "octet" to mean '
            "exactly 8 bits.",
        },
    ]
    assert [m["role"] for m in loaded.conversations[1]] == ["user", "assistant", "user", "assistant"]
    assert loaded.conversations[1][2] == {
        "role": "user",
        "content": "So is it summer in Australia at Christmas?",
    }
    # record 6 has no newline after its last <|im_end|>
    assert not json.loads(OASST_TOP1.read_text().splitlines()[5])["text"].endswith("\n")
    assert loaded.conversations[5][1]["content"].startswith("Etwa 8 Minuten und 20 Sekunden.")


def test_guanaco_parses_exactly_and_cuts_back():
    loaded = load_conversations(GUANACO, "guanaco", strict=True)
    assert len(loaded.conversations) == 11 and not loaded.dropped
    first = loaded.conversations[0]  # ends on "### Human: Now explain it to a dog", which is cut
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == (
        'Can you write a short introduction about the relevance of the term "monopsony" in economics?'
    )
    assert first[1]["content"].startswith('"Monopsony" describes a market with a single buyer')
    assert first[1]["content"].endswith("even when labour is in demand.")
    assert loaded.conversations[2] == [
        {"role": "user", "content": "Was ist der Unterschied zwischen Wetter und Klima?"},
        {
            "role": "assistant",
            "content": "Wetter beschreibt den Zustand der Atmosphäre an einem Ort zu einem bestimmten "
            "Zeitpunkt, zum Beispiel „heute regnet es in Hamburg“. Klima ist das durchschnittliche Wetter "
            "über einen langen Zeitraum, meist 30 Jahre.",
        },
        {"role": "user", "content": "Kannst du ein Beispiel für einen Klimawandel geben?"},
        {
            "role": "assistant",
            "content": "Ein Beispiel sind die Alpengletscher: Weil die Durchschnittstemperaturen in den "
            "Alpen seit dem 19. Jahrhundert um rund 2 °C gestiegen sind, haben die Gletscher mehr als die "
            "Hälfte ihres Volumens verloren. Ein einzelner heißer Sommer wäre dagegen nur Wetter.",
        },
    ]
    assert loaded.conversations[4][-1]["content"].startswith("Le Rhin est plus long")  # "Merci !" cut


def test_bad_text_records_are_counted_and_named(tmp_path):
    chatml = [
        {"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"},
        {"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"},
        {"text": "<|im_start|>bot\nBeep<|im_end|>"},
        {"text": "<|im_start|>user\n  <|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"},
        {"content": "no text field"},
        {"text": "<|im_start|>user\nAnyone?<|im_end|>\n"},
    ]
    path = write_lines(tmp_path / "top1.jsonl", [json.dumps(record).encode() for record in chatml])
    loaded = load_conversations(path, "oasst_top1")
    assert loaded.conversations == [GOOD["messages"]]
    assert dict(loaded.dropped) == {
        "malformed ChatML": 1,
        "unknown role": 1,
        "empty text": 1,
        "no text field": 1,
        "no assistant turn": 1,
    }
    assert loaded.examples == [
        f"{path}:2: no closed <|im_start|>role … <|im_end|> turn at character 29",
        f"{path}:3: turn 0: unknown role 'bot'; expected system, user or assistant",
        f"{path}:4: turn 0 (user) has empty text",
        f"{path}:5: no 'text' string in the record",
        f"{path}:6: no assistant turn, so nothing to learn",
    ]
    guanaco = [{"text": "### Human: Hi### Assistant: Hello!"}, {"text": "Human: Hi\nAssistant: Hello!"}]
    path = write_lines(tmp_path / "guanaco.jsonl", [json.dumps(record).encode() for record in guanaco])
    loaded = load_conversations(path, "guanaco")
    assert loaded.conversations == [GOOD["messages"]]
    assert loaded.examples == [f"{path}:2: the text must start with '### Human:' or '### Assistant:'"]
    with pytest.raises(DataError, match=rf"{path}:2: the text must start with .*data.strict=false"):
        load_conversations(path, "guanaco", strict=True)


# ── files: JSON lists, gzip, parquet ─────────────────────────────────────────────────
def test_json_lists_plain_and_gzipped(tmp_path):
    records = sample_records()
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(records, indent=2))
    assert load_conversations(path, "oasst_messages").conversations == BEST_THREADS
    texts = [{"text": "### Human: Hi### Assistant: Hello!"}, {"text": "nothing here"}]
    path = tmp_path / "guanaco.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump(texts, file)
    loaded = load_conversations(path, "guanaco")
    assert loaded.conversations == [GOOD["messages"]]
    assert loaded.examples == [f"{path} record 1: the text must start with '### Human:' or '### Assistant:'"]


def test_unreadable_json_list_raises_with_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON .*fix the file"):
        load_conversations(path, "guanaco")


def test_unreadable_gzip_and_parquet_files_raise(tmp_path):
    (tmp_path / "chats.jsonl.gz").write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="chats.jsonl.gz: not a gzip file; remove the .gz suffix"):
        load_conversations(tmp_path / "chats.jsonl.gz", "messages")
    (tmp_path / "chats.parquet").write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="chats.parquet: not a readable parquet file"):
        load_conversations(tmp_path / "chats.parquet", "messages")


def test_parquet_round_trip(tmp_path):
    columns = ["message_id", "parent_id", "message_tree_id", "role", "text", "lang", "rank", "deleted"]
    rows = [{key: record.get(key) for key in columns + ["review_result"]} for record in sample_records()]
    rows.append({**rows[0], "message_id": "extra", "text": " ", "message_tree_id": "extra", "rank": None})
    path = tmp_path / "oasst.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_conversations(path, "oasst_messages", threads="all")
    assert loaded.conversations == ALL_THREADS
    assert loaded.dropped == {**LEFT_OUT_BY_DESIGN, "empty text": 1}
    assert f"{path} row 26: message extra has empty text" in loaded.examples

    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"messages": GOOD["messages"][:1]}]), path)
    loaded = load_conversations(path, "messages")
    assert loaded.conversations == [GOOD["messages"]]
    assert loaded.examples == [f"{path} row 1: no assistant turn, so nothing to learn"]


# ── every shipped chat data config reads cleanly and encodes like the official template ──
def data_configs() -> list[dict]:
    """The chat sources; preference data (stage=dpo/kto/rm) has its own readers, tested in test_preference,
    and prompts (stage=grpo) theirs, in test_grpo."""
    OmegaConf.register_new_resolver("sample", sample_path, replace=True)
    files = sorted((REPO / "conf" / "data").glob("*.yaml"))
    configs = [OmegaConf.to_container(OmegaConf.load(file), resolve=True) for file in files]
    # a mixture (data.sources) names no format of its own: its sources are these files' formats
    not_chats = ("preference", "kto", "prompts")
    return [data for data in configs if "sources" not in data and data["format"] not in not_chats]


@pytest.mark.parametrize("data", data_configs(), ids=lambda data: data["name"])
def test_every_shipped_sample_encodes_like_the_template(data, tokenizer):
    tree_format = data["format"] in ("oasst_messages", "oasst_trees")
    for threads in ("best", "all") if tree_format else ("best",):
        loaded = load_conversations(
            data["path"], data["format"], lang=data.get("lang"), threads=threads, strict=True,
            messages_field=data.get("messages_field"),
        )  # fmt: skip
        assert len(loaded.conversations) == len(loaded.options) >= 4
        for conversation, options in zip(loaded.conversations, loaded.options, strict=True):
            assert conversation[-1]["role"] == "assistant"
            expected = tokenizer.apply_chat_template(
                conversation, tokenize=True, return_dict=True, **options
            )["input_ids"]
            assert encode_chat(conversation, tokenizer, **options)["input_ids"] == expected
