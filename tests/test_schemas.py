"""Schemas users have (ShareGPT, Alpaca, prompt/completion, a message list under another key) and tool calling
from data: each shipped sample reads strictly, encodes token-exactly as the official template renders its
mapped messages with the record's tools, learns exactly the assistant's answers and calls; malformed
records are counted and named by file:line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from data import DataError, encode_chat, load_conversations, prepare_dataset, prepare_from_config
from data.config import DataConfig, sample_path

SAMPLES = REPO / "data" / "samples"
TOOL_CALLING = SAMPLES / "tool_calling_sample.jsonl"
# each new shipped config (conf/data/<name>.yaml) and how many records its sample holds
SHIPPED = {
    "sharegpt_sample": 12,
    "alpaca_sample": 12,
    "prompt_completion_sample": 12,
    "conversation_field_sample": 10,
    "tool_calling_sample": 10,
}
BUILTIN_RECORDS = 4  # tool_calling_sample records that declare builtin_tools (lines 4-7)


def shipped(name: str) -> dict:
    OmegaConf.register_new_resolver("sample", sample_path, replace=True)
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml"), resolve=True)


def loaded(name: str, **settings):
    data = shipped(name)
    return load_conversations(
        data["path"], data["format"], messages_field=data.get("messages_field"), strict=True, **settings
    )


def template_ids(tokenizer, messages, **options) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"]


def template_masks(tokenizer, ids: list[int]) -> list[int]:
    """What must be learned, read off the template's tokens alone: the body of every assistant turn (after
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``) through its ``<|eot_id|>``/``<|eom_id|>``."""
    start, end_header, eot, eom = tokenizer.convert_tokens_to_ids(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
    )
    masks, index = [0] * len(ids), 0
    while index < len(ids):
        if ids[index] != start:
            index += 1
            continue
        header_end = ids.index(end_header, index)
        role = tokenizer.decode(ids[index + 1 : header_end])
        body = header_end + 2  # the "\n\n" after the header is one token
        turn_end = next(i for i in range(body, len(ids)) if ids[i] in (eot, eom))
        if role == "assistant":
            masks[body : turn_end + 1] = [1] * (turn_end + 1 - body)
        index = turn_end + 1
    return masks


# ── every shipped sample: token-exact, masks exact ─────────────────────────────────────
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sample_encodes_like_the_template_and_learns_only_the_assistant(name, tokenizer):
    result = loaded(name)
    assert len(result.conversations) == len(result.options) == SHIPPED[name]
    assert not result.dropped
    for conversation, options in zip(result.conversations, result.options, strict=True):
        encoded = encode_chat(conversation, tokenizer, **options)
        expected = template_ids(tokenizer, conversation, **options)
        assert encoded["input_ids"] == expected, conversation
        assert encoded["assistant_masks"] == template_masks(tokenizer, expected), conversation


def test_tool_calling_sample_has_what_it_promises(tokenizer):
    result = loaded("tool_calling_sample")
    options = result.options
    assert sum("builtin_tools" in o for o in options) == BUILTIN_RECORDS
    assert sum("tools" in o for o in options) == 7
    calls = [sum("tool_calls" in m for m in c) for c in result.conversations]
    assert max(calls) == 3 and sum(calls) == 14
    results = [m["content"] for c in result.conversations for m in c if m["role"] in ("tool", "ipython")]
    assert any(isinstance(r, str) for r in results) and any(isinstance(r, (dict, list)) for r in results)
    # a JSON string of tools (parquet's habit) and of arguments (OpenAI's) arrive as objects
    assert isinstance(options[7]["tools"], list) and options[7]["tools"][0]["function"]["name"]
    assert result.conversations[2][1]["tool_calls"][0]["function"]["arguments"] == {
        "origin": "BER", "destination": "MAD", "date": "2024-09-12",
    }  # fmt: skip
    # a built-in call: <|python_tag|>, ends in <|eom_id|>, learned; the tool's result is not
    encoded = encode_chat(result.conversations[3], tokenizer, **options[3])
    ids, masks = encoded["input_ids"], encoded["assistant_masks"]
    learned = tokenizer.decode([i for i, m in zip(ids, masks, strict=True) if m])
    assert learned == (
        '<|python_tag|>brave_search.call(query="2022 FIFA World Cup winner")<|eom_id|>'
        "Argentina, beating France on penalties in the final.<|eot_id|>"
    )
    assert "Argentina beat France" in tokenizer.decode(ids)


def test_custom_tool_calls_and_results(tokenizer):
    result = loaded("tool_calling_sample")
    encoded = encode_chat(result.conversations[1], tokenizer, **result.options[1])
    ids, masks = encoded["input_ids"], encoded["assistant_masks"]
    learned = tokenizer.decode([i for i, m in zip(ids, masks, strict=True) if m])
    assert learned == (
        '{"name": "convert_currency", "parameters": {"amount": 20000, "source": "JPY", "target": "EUR"}}'
        '<|eot_id|>{"name": "get_weather", "parameters": {"city": "Tokyo"}}<|eot_id|>'
        "20,000 yen is about €122.40, and Tokyo is clear at 27 °C.<|eot_id|>"
    )
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"amount": 122.4' in tokenizer.decode(ids)


# ── each format's mapping ────────────────────────────────────────────────────────────
def test_sharegpt_roles_function_call_observation_and_system():
    conversations = loaded("sharegpt_sample").conversations
    assert conversations[3][0] == {"role": "system", "content": "Antworte immer auf Deutsch."}
    assert conversations[7] == [
        {"role": "user", "content": "I was born on 1990-05-15. How old am I?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculate_age", "arguments": {"birth_date": "1990-05-15"}},
                }
            ],
        },
        {"role": "tool", "content": '{"age": 34}'},
        {"role": "assistant", "content": "You are 34 years old."},
    ]
    assert conversations[9][-1] == {"role": "assistant", "content": "Joyful."}  # cut back to the last answer
    # format=messages still reads ShareGPT records, the same way
    assert load_conversations(SAMPLES / "sharegpt_sample.jsonl", "messages").conversations == conversations


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    conversations = loaded("alpaca_sample").conversations
    assert conversations[1] == [
        {"role": "user", "content": "Translate the sentence into French.\n\nThe library opens at nine."},
        {"role": "assistant", "content": "La bibliothèque ouvre à neuf heures."},
    ]
    assert conversations[0][0] == {
        "role": "user",
        "content": "Give three tips for staying healthy.",
    }  # input ""
    assert conversations[5][0]["content"] == "What is the capital of Canada?"  # no input at all
    assert conversations[7][0] == {"role": "system", "content": "You are an English grammar tutor."}
    assert [m["content"] for m in conversations[9]] == [
        "What is the largest continent?", "Asia.", "And the largest ocean?", "The Pacific Ocean.",
    ]  # fmt: skip


def test_prompt_completion_standard_and_conversational():
    conversations = loaded("prompt_completion_sample").conversations
    assert conversations[1] == [
        {"role": "user", "content": "Name the largest planet in the solar system."},
        {"role": "assistant", "content": " Jupiter."},  # the template trims it
    ]
    assert [m["role"] for m in conversations[6]] == ["system", "user", "assistant"]
    assert [m["role"] for m in conversations[7]] == ["user", "assistant", "user", "assistant"]


def test_messages_field_reads_another_key_and_is_checked(tmp_path):
    conversations = loaded("conversation_field_sample").conversations
    assert conversations[0][0] == {"role": "user", "content": "What is the chemical symbol for gold?"}
    with pytest.raises(
        DataError, match="data.messages_field applies to formats messages, sharegpt, not 'alpaca'"
    ):
        load_conversations(SAMPLES / "alpaca_sample.json", "alpaca", messages_field="conversation")
    with pytest.raises(DataError, match="data.messages_field: '' is no key"):
        load_conversations(SAMPLES / "conversation_field_sample.jsonl", "messages", messages_field="")
    result = load_conversations(
        SAMPLES / "conversation_field_sample.jsonl", "messages", messages_field="dialog"
    )
    assert result.dropped == {"no messages list": 10}
    assert result.examples == [
        f"{SAMPLES / 'conversation_field_sample.jsonl'}:1: no 'dialog' list in the record"
    ]


# ── malformed records: counted, named by file:line, raised when strict ──────────────────
def user(text="Hi"):
    return {"role": "user", "content": text}


def call(name="get_weather", arguments=None, **extra):
    function = {"name": name, "arguments": {"city": "Paris"} if arguments is None else arguments}
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": function}], **extra}


ANSWER = {"role": "assistant", "content": "Done."}
RESULT = {"role": "tool", "content": "ok"}
BAD_MESSAGES = [  # (record, reason, start of the message after "file:line: ")
    ({"messages": [user(), {"role": "assistant", "tool_calls": {"name": "x"}}, RESULT, ANSWER]},
     "invalid message", "message 1: Llama 3.1 makes exactly one tool call per message"),
    ({"messages": [user(), {**call(), "tool_calls": call()["tool_calls"] * 2}, RESULT, ANSWER]},
     "invalid message", "message 1: Llama 3.1 makes exactly one tool call per message"),
    ({"messages": [user(), {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, ANSWER]},
     "invalid message", "message 1: a tool call is"),
    ({"messages": [user(), call(arguments=5), RESULT, ANSWER]},
     "invalid tool call", "message 1: tool call arguments must be an object (or a JSON string of one), got"),
    ({"messages": [user(), call(arguments='{"city": '), RESULT, ANSWER]},
     "invalid tool call", "message 1: tool call arguments are malformed JSON"),
    ({"messages": [user(), {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, ANSWER]},
     "invalid tool call", "message 1: the tool call has no arguments"),
    ({"messages": [user(), {"role": "function", "content": "x"}, ANSWER]},
     "invalid message", "message 1: unknown role 'function'"),
    ({"messages": [user(), call(), {"role": "tool", "content": 3}, ANSWER]},
     "invalid message", "message 2: tool output must be a string or JSON object/list"),
    ({"tools": {"name": "x"}, "messages": [user(), ANSWER]},
     "invalid tools", "tools: expected a list of JSON schemas"),
    ({"tools": "[{not json", "messages": [user(), ANSWER]}, "invalid tools", "tools: malformed JSON string"),
    ({"builtin_tools": "brave_search", "messages": [user(), ANSWER]},
     "invalid tools", "builtin_tools: expected a list of tool names"),
    ({"tools": [{"name": "f"}], "messages": [ANSWER]},
     "invalid tools", "custom tools go in the first user message"),
]  # fmt: skip


def write_records(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_malformed_calls_and_tools_are_bad_records_with_file_and_line(tmp_path):
    good = {"tools": [{"name": "get_weather"}], "messages": [user(), call(), RESULT, ANSWER]}
    path = write_records(
        tmp_path / "tools.jsonl", [good] + [record for record, _, _ in BAD_MESSAGES] + [good]
    )
    result = load_conversations(path, "messages")
    assert len(result.conversations) == 2 and result.options[0] == {"tools": [{"name": "get_weather"}]}
    reasons = [reason for _, reason, _ in BAD_MESSAGES]
    assert dict(result.dropped) == {reason: reasons.count(reason) for reason in reasons}
    for line, (_, reason, detail) in enumerate(BAD_MESSAGES, start=2):
        if reasons.index(reason) == line - 2:  # the first of each reason is named
            assert any(e.startswith(f"{path}:{line}: {detail}") for e in result.examples), (
                line,
                result.examples,
            )
    with pytest.raises(
        DataError, match=rf"{path}:2: message 1: Llama 3.1 makes exactly one .*data.strict=false"
    ):
        load_conversations(path, "messages", strict=True)


@pytest.mark.parametrize(
    ("format", "record", "reason", "detail"),
    [
        ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
         "invalid message", "message 1: unknown role 'bot'"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"},
                                        {"from": "function_call", "value": "{x"},
                                        {"from": "gpt", "value": "Yo"}]},
         "invalid tool call", "message 1: function_call is malformed JSON"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"},
                                        {"from": "function_call", "value": '{"arguments": {}}'}]},
         "invalid tool call", 'message 1: a function_call is one JSON {"name": ..., "arguments": {...}}'),
        ("sharegpt", {"messages": []}, "no messages list", "no ShareGPT 'conversations' list in the record"),
        ("alpaca", {"instruction": "Say hi."}, "no output", "no 'output' string in the record"),
        ("alpaca", {"output": "Hi"}, "no instruction", "no 'instruction' string in the record"),
        ("alpaca", {"instruction": "a", "output": "b", "history": [["only one"]]},
         "invalid message", "history 0: expected [instruction, output] strings"),
        ("prompt_completion", {"prompt": "Hi"}, "no prompt or completion", "no 'prompt' and 'completion'"),
        ("prompt_completion", {"prompt": "Hi", "completion": 3},
         "invalid message", "completion: expected a string or a list of messages"),
        ("prompt_completion", {"prompt": "Hi", "completion": [{"role": "user", "content": "x"}]},
         "no assistant turn", "the completion has no assistant turn"),
    ],
)  # fmt: skip
def test_bad_records_of_each_format_are_named(tmp_path, format, record, reason, detail):
    path = write_records(tmp_path / "bad.jsonl", [record])
    result = load_conversations(path, format)
    assert result.dropped == {reason: 1}
    assert result.examples[0].startswith(f"{path}:1: {detail}"), result.examples
    with pytest.raises(DataError, match=f"{path}:1: "):
        load_conversations(path, format, strict=True)


# ── Llama 3.2: built-in tools are bad records, custom tools encode as its template does ──
def test_builtin_tools_under_llama32_are_counted_bad_records(tokenizer32, tmp_path):
    result = load_conversations(TOOL_CALLING, "messages", chat_format="llama3.2")
    assert result.dropped == {"built-in tools under llama3.2": BUILTIN_RECORDS}
    assert result.examples[0].startswith(
        f"{TOOL_CALLING}:4: built-in tools ['brave_search', 'wolfram_alpha']"
    )
    assert "Llama 3.2's chat template has none" in result.examples[0]
    for conversation, options in zip(result.conversations, result.options, strict=True):
        # Llama 3.2's template writes today's date unless given one; the encoder writes the template's default
        expected = template_ids(tokenizer32, conversation, date_string="26 Jul 2024", **options)
        assert encode_chat(conversation, tokenizer32, **options)["input_ids"] == expected
    dataset, summary = prepare_dataset(
        TOOL_CALLING, "messages", tokenizer32, max_length=4096, cache_dir=tmp_path
    )
    assert len(dataset) == summary.conversations == SHIPPED["tool_calling_sample"] - BUILTIN_RECORDS
    assert summary.dropped == {"built-in tools under llama3.2": BUILTIN_RECORDS}
    assert summary.examples[0].startswith(f"{TOOL_CALLING}:4: built-in tools")
    with pytest.raises(DataError, match=rf"{TOOL_CALLING}:4: built-in tools"):
        load_conversations(TOOL_CALLING, "messages", chat_format="llama3.2", strict=True)


# ── the pipeline: prepare_from_config and the command ────────────────────────────────────
@pytest.mark.parametrize("name", SHIPPED)
def test_prepare_from_config_on_each_shipped_sample(name, tokenizer, tmp_path):
    data = DataConfig(**{**shipped(name), "num_proc": 1, "cache_dir": str(tmp_path)})
    dataset, evaluated, summary = prepare_from_config(data, tokenizer, max_length=4096)
    assert evaluated is None and summary.dropped == {} and summary.truncated == 0
    result = loaded(name)
    assert len(dataset) == summary.conversations == SHIPPED[name]
    for row, conversation, options in zip(dataset, result.conversations, result.options, strict=True):
        assert row == encode_chat(conversation, tokenizer, **options)
    assert summary.trainable_tokens == sum(sum(m) for m in dataset["assistant_masks"])


def test_prepare_refuses_messages_field_on_a_format_without_a_message_list(tokenizer, tmp_path):
    data = DataConfig(**{**shipped("preference_sample"), "num_proc": 1, "messages_field": "conversation"})
    with pytest.raises(
        DataError, match="data.messages_field applies to formats messages, sharegpt, not 'preference'"
    ):
        prepare_from_config(data, tokenizer, max_length=512, objective="dpo")


def test_cli_prepares_the_tool_calling_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data.prepare", "data=tool_calling_sample", f"data.cache_dir={tmp_path}",
         "training.max_length=4096"],
        cwd=REPO, env={key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{SHIPPED['tool_calling_sample']} conversations" in result.stdout
    assert f"saved in {tmp_path}" in result.stdout


def test_parquet_with_tools_and_arguments_as_json_strings(tmp_path):
    """Parquet holds one struct type per column, so tools and arguments come as JSON strings there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [user("Weather in Paris?"), call(arguments='{"city": "Paris"}', content=None), RESULT, ANSWER]
    rows = [
        {"tools": json.dumps([weather]), "messages": messages},
        {"tools": None, "messages": [user(), {**ANSWER, "tool_calls": None}]},
    ]
    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_conversations(path, "messages", strict=True)
    assert result.options == [{"tools": [weather]}, {}]
    assert result.conversations[0][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert result.conversations[1] == [{"role": "user", "content": "Hi"}, ANSWER]
