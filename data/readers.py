"""Readers: local chat files → conversations (lists of message dicts, as ``data.chat`` encodes them), each
with the encoder options its record declares (``tools``, ``builtin_tools``).

Formats (``format=``), each mapped onto messages by one small function below:

- ``messages``: a ``messages`` list of ``{role, content}`` (TRL's conversational shape; ``tool_calls`` on
  assistant turns and ``tool``/``ipython`` turns as TRL and the Llama 3.1 template write them). A record
  with ShareGPT's ``conversations`` instead is read as ``sharegpt``, as it always was.
- ``sharegpt``: a ``conversations`` list of ``{from, value}``; ``from`` is ``human``/``user``,
  ``gpt``/``assistant``, ``system``, ``function_call`` (a JSON ``{name, arguments}`` call by the assistant)
  or ``observation``/``tool`` (the tool's result), the roles LLaMA-Factory's ShareGPT reads (axolotl's
  ``tool`` too); a top-level ``system`` string is the system prompt, as in LLaMA-Factory.
- ``alpaca``: ``instruction`` and an optional ``input`` make the user turn (instruction, a blank line,
  input: the way Alpaca's own prompt separates them; LLaMA-Factory joins with one newline), ``output``
  the assistant turn; optional ``system`` and ``history`` (``[[instruction, output], ...]`` before it).
- ``prompt_completion``: TRL's prompt-completion type, ``prompt`` and ``completion`` each a plain string
  (standard: a user turn, an assistant turn) or a list of messages (conversational). Loss falls on every
  assistant turn, as in ``messages``; an assistant turn inside ``prompt`` is learned too.
- ``oasst_messages`` / ``oasst_trees``: the OpenAssistant oasst1/oasst2 exports, flat
  (``*.messages.jsonl.gz``) or nested (``*.trees.jsonl.gz``), made into threads by ``data.oasst``.
- ``oasst_top1``: ChatML text in ``text``, as in OpenAssistant/oasst_top1_2023-08-25.
- ``guanaco``: ``### Human: …### Assistant: …`` text in ``text``, as in timdettmers/openassistant-guanaco.

``messages_field`` names the list under another key (``data.messages_field``) for ``messages`` and
``sharegpt``. Tools, per record, in any record format: ``tools`` is a list of JSON schemas (TRL's dataset
convention; a JSON string of that list too, as parquet files often hold it), ``builtin_tools`` a list of
Llama 3.1's built-in tool names (``brave_search``, ``wolfram_alpha``, ``code_interpreter``: the
template's variable), so a call to one renders as ``<|python_tag|>name.call(...)`` ending in
``<|eom_id|>``. A call's ``arguments`` may be an object or a JSON string of one (OpenAI's shape). Both
reach ``encode_chat`` through ``Conversations.options``.

Files: JSON lines, a JSON list of records (the file starts with ``[``), either gzipped (``.gz``),
or ``.parquet``. A source (``locate_source``) is one such file, a directory or glob of them (shards, read
in sorted order), a ``datasets`` ``save_to_disk`` directory, or ``hf:<name>[:<split>]``, a dataset in the
local Hugging Face datasets cache, read offline. Every conversation returned passes the encoder's checks
(``data.chat.check_chat``, for the ``chat_format`` it will be encoded in: Llama 3.2 has no built-in
tools) and ends on an assistant turn: turns after the last assistant turn are cut, as nothing would
learn from them.

Whatever is left out is counted by reason, and the first of each reason is named by file:line
(or ``file record N`` / ``file row N``, counted from 0), so nothing disappears silently;
``strict=True`` raises on the first bad record instead. Left out by design, and so counted
but never an error: deleted and failed-review OpenAssistant messages, trees outside ``lang``,
and trees with no assistant reply.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from data import oasst
from data.chat import check_chat, validate_messages
from data.config import MESSAGES_FIELDS
from data.sources import DataError, Progress, Report, locate_source, read_records

FORMATS = (
    "messages", "sharegpt", "alpaca", "prompt_completion", "oasst_messages", "oasst_trees", "oasst_top1",
    "guanaco",
)  # fmt: skip
TREE_FORMATS = ("oasst_messages", "oasst_trees")
_STRICT_FIX = "fix the record, or set data.strict=false to skip and count such records"
# ShareGPT's roles (``from``), as LLaMA-Factory reads them (data/README.md: human, gpt, system,
# function_call, observation) and axolotl's ``tool``; function_call is handled apart (_sharegpt_call).
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
}
_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.DOTALL)
_CHATML_ROLES = ("system", "user", "assistant")
_GUANACO_MARKER = re.compile(r"### (Human|Assistant):")
_GUANACO_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(kw_only=True)
class ReadResult:
    """What a reader left out of ``source``, counted by reason, with the first of each named."""

    source: str
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def drop(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] == 1:
            self.examples.append(f"{where}: {detail}")

    def summary(self) -> str:
        lines = [f"{self.source}: {self.found()}, {sum(self.dropped.values())} dropped"]
        lines += [f"  dropped {count} × {reason}" for reason, count in self.dropped.most_common()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)

    def found(self) -> str:
        """What was read, for the summary's first line."""
        raise NotImplementedError


@dataclass
class Conversations(ReadResult):
    """What a reader produced: the conversations (iterating it yields them), what it left out by reason,
    and the first of each (``summary()``)."""

    conversations: list[list[dict]] = field(default_factory=list)
    # one per conversation: the encoder options its record declares (``tools``, ``builtin_tools``), or {}
    options: list[dict] = field(default_factory=list)
    # load_conversations(stream=True): each conversation and its options, read as it is asked for
    stream: Iterator[tuple[list[dict], dict]] | None = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[list[dict]]:
        return iter(self.conversations)

    def found(self) -> str:
        return f"{len(self.conversations)} conversations"


def load_conversations(
    path: str | Path,
    format: str = "messages",
    *,
    lang: Sequence[str] | None = None,
    threads: str = "best",
    strict: bool = False,
    messages_field: str | None = None,
    chat_format: str = "llama3.1",
    stream: bool = False,
    progress: Progress | None = None,
) -> Conversations:
    """Read ``path`` in ``format`` into conversations, counting what is left out and why.

    ``stream=True``: for a source of any size. Nothing is read yet and the lists stay empty: the result's
    ``stream`` yields each conversation with its options as it is read (``read_conversations``), and the
    result counts what is left out as it goes, so its counts are whole once ``stream`` is exhausted.
    ``progress``: the bytes read so far (``data.sources.Progress``).

    ``messages_field``: the key of the message list (``messages``, ``sharegpt``; None: their default).
    ``chat_format``: the template the conversations will be encoded in (``data.chat.chat_format_of``);
    a record the encoder would refuse in it (built-in tools under ``llama3.2``) is a bad record.

    ``lang`` (language codes, None for all) and ``threads`` apply to the OpenAssistant tree
    formats only: a tree's language is its root prompt's ``lang``; ``threads="best"`` gives one
    thread per tree, ``"all"`` every root-to-leaf path (see ``data.oasst.threads``). Counts are
    of records, except for trees: a left-out message is counted once, for itself and the
    replies below it; "language filtered" and "no assistant turn" count trees.
    """
    result = Conversations(source=str(Path(path)))
    read = read_conversations(
        path, format, result, lang=lang, threads=threads, strict=strict, messages_field=messages_field,
        chat_format=chat_format, progress=progress,
    )  # fmt: skip
    if stream:
        result.stream = read
        return result
    for messages, options in read:
        result.conversations.append(messages)
        result.options.append(options)
    return result


def read_conversations(
    path: str | Path,
    format: str,
    read: ReadResult,
    *,
    lang: Sequence[str] | None = None,
    threads: str = "best",
    strict: bool = False,
    messages_field: str | None = None,
    chat_format: str = "llama3.1",
    progress: Progress | None = None,
) -> Iterator[tuple[list[dict], dict]]:
    """``load_conversations`` one at a time: each conversation with its encoder options, in order, what is
    left out counted on ``read`` as it goes. The settings are checked at the call, before any reading.

    Formats of one record per conversation stream: nothing of the source is held but the record at hand.
    The OpenAssistant tree formats read every record first, since a thread needs its whole tree.
    ``progress``: bytes of the source read so far (``data.sources.Progress``), updated as it reads.
    """
    path = Path(path)
    languages = _checked_arguments(path, format, lang, threads, messages_field)
    report = reporter(read, strict)
    if format in TREE_FORMATS:
        return _tree_threads(path, format, read, report, languages, threads, progress)
    parse = _RECORD_PARSERS[format]
    if format in MESSAGES_FIELDS:
        parse = partial(parse, field=messages_field or MESSAGES_FIELDS[format])
    return _records(path, parse, report, chat_format, progress)


def reporter(result: ReadResult, strict: bool) -> Report:
    """The ``report(where, error)`` a reader hands down: count and name on ``result``, or raise if strict."""

    def report(where: str, error: DataError) -> None:
        if strict:
            raise DataError(error.reason, f"{where}: {error.detail} ({_STRICT_FIX})")
        result.drop(where, error.reason, error.detail)

    return report


def _checked_arguments(
    path: Path, format: str, lang: Sequence[str] | None, threads: str, messages_field: str | None
) -> set[str] | None:
    """Fail before reading: unknown format or thread policy, tree settings on a flat format, a
    ``messages_field`` on a format without a message list, no file."""
    if format not in FORMATS:
        raise DataError(
            "unknown format", f"{path}: unknown data format {format!r}; expected one of {', '.join(FORMATS)}"
        )
    check_messages_field(format, messages_field)
    if threads not in oasst.THREAD_POLICIES:
        raise DataError("unknown threads", f"data.threads: {threads!r} is not one of best, all")
    return checked_source(
        path, format, lang, {"data.lang": lang is not None, "data.threads=all": threads != "best"}
    )


def check_messages_field(format: str, messages_field: str | None) -> None:
    """``data.messages_field`` names a key of formats that hold a message list, and only theirs."""
    if messages_field is None:
        return
    if format not in MESSAGES_FIELDS:
        raise DataError(
            "invalid setting",
            f"data.messages_field applies to formats {', '.join(MESSAGES_FIELDS)}, not {format!r}; remove it",
        )
    if not isinstance(messages_field, str) or not messages_field:
        raise DataError(
            "invalid setting",
            f"data.messages_field: {messages_field!r} is no key; name the record's message list "
            f"(null: {MESSAGES_FIELDS[format]!r})",
        )


def checked_source(
    path: Path, format: str, lang: str | Sequence[str] | None, tree_settings: dict[str, bool]
) -> set[str] | None:
    """The checks every reader makes before reading, after its own: no settings for OpenAssistant trees
    (``tree_settings``: name → whether it is set) on another format, a file there, a ``data.lang`` that
    keeps something. Returns ``lang`` as a set (None keeps every language)."""
    _check_tree_settings(format, tree_settings)
    checked_file(path)
    return _checked_languages(lang)


def _check_tree_settings(format: str, given: dict[str, bool]) -> None:
    """Raise, naming the first of ``given`` that is set, when ``format`` is no OpenAssistant tree format."""
    setting = next((name for name, is_set in given.items() if is_set), None)
    if format not in TREE_FORMATS and setting is not None:
        raise DataError(
            "not a tree format",
            f"{setting} applies to OpenAssistant trees ({', '.join(TREE_FORMATS)}), not format {format!r}; "
            "remove it",
        )


def checked_file(path: Path) -> None:
    """Raise, naming what was looked for, unless ``path`` locates a source (``locate_source``)."""
    locate_source(path)


def _checked_languages(lang: str | Sequence[str] | None) -> set[str] | None:
    """``data.lang`` as a set (None keeps every language); an empty list is an error."""
    if lang is None:
        return None
    languages = {lang} if isinstance(lang, str) else set(lang)
    if not languages:
        raise DataError(
            "empty lang", "data.lang is empty, which keeps nothing; use null to keep every language"
        )
    return languages


# ── one record, one conversation: messages, ShareGPT, Alpaca, prompt/completion, ChatML, guanaco ──
def _records(
    path: Path,
    parse: Callable[[Any], list[dict]],
    report: Report,
    chat_format: str,
    progress: Progress | None,
) -> Iterator[tuple[list[dict], dict]]:
    for where, record in read_records(path, report, progress):
        try:
            messages = parse(record)
            options = _chat_options(record)
            messages = _conversation(messages, options, chat_format)
        except DataError as error:
            report(where, error)
            continue
        yield messages, options


def _conversation(messages: list[dict], options: dict, chat_format: str) -> list[dict]:
    """``messages`` checked by ``validate_messages``, cut back to end on its last assistant turn, and
    checked with its ``options`` as the encoder will encode them (``check_chat``)."""
    try:
        validate_messages(messages)
    except ValueError as error:
        raise DataError("invalid message", str(error)) from None
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("no assistant turn", "no assistant turn, so nothing to learn")
    messages = messages[: last + 1]
    try:
        check_chat(messages, chat_format=chat_format, **options)
    except ValueError as error:  # the options: built-in tools under llama3.2, or tools the dialog cannot hold
        builtin = "builtin_tools" in options and str(error).startswith("built-in tools")
        raise DataError(
            f"built-in tools under {chat_format}" if builtin else "invalid tools", str(error)
        ) from None
    return messages


def _chat_options(record: Any) -> dict:
    """The encoder options a record declares: ``tools`` (JSON schemas, or a JSON string of their list) and
    ``builtin_tools`` (names); absent or null ones are left out."""
    options = {}
    if not isinstance(record, dict):
        return options
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError("invalid tools", f"tools: malformed JSON string ({error.msg})") from None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise DataError("invalid tools", "tools: expected a list of JSON schemas (objects)")
        options["tools"] = tools
    builtin = record.get("builtin_tools")
    if builtin is not None:
        if not isinstance(builtin, list) or not all(isinstance(name, str) for name in builtin):
            raise DataError("invalid tools", "builtin_tools: expected a list of tool names")
        options["builtin_tools"] = builtin
    return options


def _message(index: int, message: Any, role_key: str = "role", content_key: str = "content") -> dict:
    """One message as the encoder reads it: role, content, and ``tool_calls`` when it has some."""
    if not isinstance(message, dict):
        raise DataError(
            "invalid message", f"message {index}: expected an object, got {type(message).__name__}"
        )
    result = {"role": message.get(role_key), "content": message.get(content_key)}
    if message.get("tool_calls") is not None:
        result["tool_calls"] = _tool_calls(index, message["tool_calls"])
    return result


def _tool_calls(index: int, tool_calls: Any) -> Any:
    """``tool_calls`` with each call's ``arguments`` an object: a JSON string of one is decoded (OpenAI's
    shape). The rest of a call's shape is ``validate_messages``'s to check."""
    if not isinstance(tool_calls, list):
        return tool_calls
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            call = {**call, "function": {**function, "arguments": _arguments(index, function)}}
        calls.append(call)
    return calls


def _arguments(index: int, function: dict) -> dict:
    if "arguments" not in function:
        raise DataError("invalid tool call", f"message {index}: the tool call has no arguments")
    arguments = _decoded(index, function["arguments"], "tool call arguments are")
    if not isinstance(arguments, dict):
        raise DataError(
            "invalid tool call",
            f"message {index}: tool call arguments must be an object (or a JSON string of one), "
            f"got {type(arguments).__name__}",
        )
    return arguments


def _decoded(index: int, value: Any, what: str) -> Any:
    """``value``, read as JSON when it is a string (as parquet and ShareGPT keep calls); malformed JSON is an
    invalid tool call of message ``index``."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        detail = f"message {index}: {what} malformed JSON ({error.msg})"
        raise DataError("invalid tool call", detail) from None


def _message_list(record: Any, field: str) -> list | None:
    value = record.get(field) if isinstance(record, dict) else None
    return value if isinstance(value, list) else None


def _messages_record(record: Any, field: str = "messages") -> list[dict]:
    """TRL's conversational ``messages`` (under ``field``); ShareGPT ``conversations`` read as sharegpt."""
    if (messages := _message_list(record, field)) is not None:
        return [_message(index, message) for index, message in enumerate(messages)]
    if field == "messages" and _message_list(record, "conversations") is not None:
        return _sharegpt_record(record)
    also = " (or ShareGPT 'conversations')" if field == "messages" else ""
    raise DataError("no messages list", f"no {field!r}{also} list in the record")


def _sharegpt_record(record: Any, field: str = "conversations") -> list[dict]:
    """ShareGPT ``{from, value}`` turns (``_SHAREGPT_ROLES``), a ``function_call`` turn an assistant call."""
    if (turns := _message_list(record, field)) is None:
        raise DataError("no messages list", f"no ShareGPT {field!r} list in the record")
    messages = []
    for index, turn in enumerate(turns):
        message = _message(index, turn, "from", "value")
        if message["role"] == "function_call":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": _sharegpt_call(index, message["content"]),
            }
        elif isinstance(message["role"], str):
            message["role"] = _SHAREGPT_ROLES.get(message["role"], message["role"])
        messages.append(message)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt_call(index: int, value: Any) -> list[dict]:
    """A ``function_call`` turn's value, JSON ``{"name", "arguments"}`` (or a list of one), as tool_calls."""
    value = _decoded(index, value, "function_call is")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise DataError(
            "invalid tool call",
            f'message {index}: a function_call is one JSON {{"name": ..., "arguments": {{...}}}}',
        )
    return [{"type": "function", "function": {"name": value["name"], "arguments": _arguments(index, value)}}]


def _alpaca_record(record: Any) -> list[dict]:
    """``instruction`` (+ a blank line + ``input``) → user, ``output`` → assistant; ``system``, history."""
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
        raise DataError("no instruction", "no 'instruction' string in the record")
    if not isinstance(record.get("output"), str):
        raise DataError("no output", "no 'output' string in the record")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError("invalid message", f"'input' must be a string, got {type(extra).__name__}")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for index, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise DataError("invalid message", f"history {index}: expected [instruction, output] strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = record["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _prompt_completion_record(record: Any) -> list[dict]:
    """TRL's prompt-completion: each part a string (a user turn, an assistant turn) or a message list."""
    if not isinstance(record, dict) or "prompt" not in record or "completion" not in record:
        raise DataError("no prompt or completion", "no 'prompt' and 'completion' in the record")
    parts = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        part = record[name]
        if isinstance(part, str):
            parts.append([{"role": role, "content": part}])
        elif isinstance(part, list):
            parts.append(part)
        else:
            raise DataError("invalid message", f"{name}: expected a string or a list of messages")
    prompt, completion = parts
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
        raise DataError("no assistant turn", "the completion has no assistant turn, so nothing to learn")
    return [_message(index, message) for index, message in enumerate(prompt + completion)]


def _chatml_record(record: Any) -> list[dict]:
    """``<|im_start|>{role}\\n{content}<|im_end|>`` turns, newline-separated (the last newline optional)."""
    text, messages, end = _text_field(record), [], 0
    for turn in _CHATML_TURN.finditer(text):
        if text[end : turn.start()].strip():
            raise DataError("malformed ChatML", f"text outside a turn at character {end}")
        role, content = turn.group(1).strip(), turn.group(2)
        if role not in _CHATML_ROLES:
            raise DataError(
                "unknown role",
                f"turn {len(messages)}: unknown role {role!r}; expected system, user or assistant",
            )
        if "<|im_start|>" in content:
            raise DataError(
                "malformed ChatML", f"turn {len(messages)} has no <|im_end|> before the next turn"
            )
        messages.append(_turn(role, content, len(messages)))
        end = turn.end()
    if not messages or text[end:].strip():
        raise DataError(
            "malformed ChatML", f"no closed <|im_start|>role … <|im_end|> turn at character {end}"
        )
    return messages


def _guanaco_record(record: Any) -> list[dict]:
    """``### Human: …### Assistant: …`` turns, any number, whitespace around them ignored."""
    parts = _GUANACO_MARKER.split(_text_field(record))
    if len(parts) == 1 or parts[0].strip():
        raise DataError("malformed guanaco", "the text must start with '### Human:' or '### Assistant:'")
    speakers, contents = parts[1::2], parts[2::2]
    return [
        _turn(_GUANACO_ROLES[s], content, i)
        for i, (s, content) in enumerate(zip(speakers, contents, strict=True))
    ]


def _text_field(record: Any) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError("no text field", "no 'text' string in the record")
    return record["text"]


def _turn(role: str, content: str, index: int) -> dict:
    if not content.strip():
        raise DataError("empty text", f"turn {index} ({role}) has empty text")
    return {"role": role, "content": content.strip()}


_RECORD_PARSERS = {
    "messages": _messages_record,
    "sharegpt": _sharegpt_record,
    "alpaca": _alpaca_record,
    "prompt_completion": _prompt_completion_record,
    "oasst_top1": _chatml_record,
    "guanaco": _guanaco_record,
}


# ── OpenAssistant trees: many records, many threads (data.oasst) ─────────────────────
def _tree_threads(
    path: Path, format: str, read: ReadResult, report: Report, languages, threads, progress: Progress | None
) -> Iterator[tuple[list[dict], dict]]:
    roots, left_out = read_trees(path, format, read, report, progress)
    for thread in oasst.conversations(roots, languages, threads, left_out):
        yield thread, {}


def read_trees(
    path: Path, format: str, result: ReadResult, report: Report, progress: Progress | None = None
) -> tuple[list[oasst.Message], oasst.LeftOut]:
    """The trees of an OpenAssistant export (``format`` in TREE_FORMATS), not yet pruned, and the
    ``left_out`` callback for ``data.oasst``: by-design reasons are counted on ``result``, never raised."""

    def left_out(where: str, reason: str, detail: str) -> None:
        if reason in oasst.BY_DESIGN:  # counted, but no error even in strict mode
            result.drop(where, reason, detail)
        else:
            report(where, DataError(reason, detail))

    read_roots = oasst.flat_roots if format == "oasst_messages" else oasst.nested_roots
    return read_roots(read_records(path, report, progress), left_out), left_out
