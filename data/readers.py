"""Readers: local chat files → conversations (lists of ``{role, content}`` message dicts).

Formats (``format=``):

- ``messages``: a ``messages`` list of ``{role, content}`` (TRL's conversational shape), or
  ShareGPT's ``conversations`` list of ``{from, value}``.
- ``oasst_messages`` / ``oasst_trees``: the OpenAssistant oasst1/oasst2 exports, flat
  (``*.messages.jsonl.gz``) or nested (``*.trees.jsonl.gz``), made into threads by ``data.oasst``.
- ``oasst_top1``: ChatML text in ``text``, as in OpenAssistant/oasst_top1_2023-08-25.
- ``guanaco``: ``### Human: …### Assistant: …`` text in ``text``, as in timdettmers/openassistant-guanaco.

Files: JSON lines, a JSON list of records (the file starts with ``[``), either gzipped (``.gz``),
or ``.parquet``. Every conversation returned passes ``validate_messages`` and ends on an
assistant turn: turns after the last assistant turn are cut, as nothing would learn from them.

Whatever is left out is counted by reason, and the first of each reason is named by file:line
(or ``file record N`` / ``file row N``, counted from 0), so nothing disappears silently;
``strict=True`` raises on the first bad record instead. Left out by design, and so counted
but never an error: deleted and failed-review OpenAssistant messages, trees outside ``lang``,
and trees with no assistant reply.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data import oasst
from data.chat import validate_messages

FORMATS = ("messages", "oasst_messages", "oasst_trees", "oasst_top1", "guanaco")
TREE_FORMATS = ("oasst_messages", "oasst_trees")
_STRICT_FIX = "fix the record, or set data.strict=false to skip and count such records"
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.DOTALL)
_CHATML_ROLES = ("system", "user", "assistant")
_GUANACO_MARKER = re.compile(r"### (Human|Assistant):")
_GUANACO_ROLES = {"Human": "user", "Assistant": "assistant"}


class DataError(ValueError):
    """A record or file that cannot be used; the message names file, line and fix."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


Report = Callable[[str, DataError], None]


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
) -> Conversations:
    """Read ``path`` in ``format`` into conversations, counting what is left out and why.

    ``lang`` (language codes, None for all) and ``threads`` apply to the OpenAssistant tree
    formats only: a tree's language is its root prompt's ``lang``; ``threads="best"`` gives one
    thread per tree, ``"all"`` every root-to-leaf path (see ``data.oasst.threads``). Counts are
    of records, except for trees: a left-out message is counted once, for itself and the
    replies below it; "language filtered" and "no assistant turn" count trees.
    """
    path = Path(path)
    languages = _checked_arguments(path, format, lang, threads)
    result = Conversations(source=str(path))
    report = reporter(result, strict)
    if format in TREE_FORMATS:
        _add_tree_threads(path, format, result, report, languages, threads)
    else:
        _add_records(path, _RECORD_PARSERS[format], result, report)
    return result


def reporter(result: ReadResult, strict: bool) -> Report:
    """The ``report(where, error)`` a reader hands down: count and name on ``result``, or raise if strict."""

    def report(where: str, error: DataError) -> None:
        if strict:
            raise DataError(error.reason, f"{where}: {error.detail} ({_STRICT_FIX})")
        result.drop(where, error.reason, error.detail)

    return report


def _checked_arguments(path: Path, format: str, lang: Sequence[str] | None, threads: str) -> set[str] | None:
    """Fail before reading: unknown format or thread policy, tree settings on a flat format, no file."""
    if format not in FORMATS:
        raise DataError(
            "unknown format", f"{path}: unknown data format {format!r}; expected one of {', '.join(FORMATS)}"
        )
    if threads not in oasst.THREAD_POLICIES:
        raise DataError("unknown threads", f"data.threads: {threads!r} is not one of best, all")
    return checked_source(
        path, format, lang, {"data.lang": lang is not None, "data.threads=all": threads != "best"}
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
    if not path.is_file():
        raise DataError("missing file", f"{path}: no such file; set data.path to a local file")


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


# ── files → records ─────────────────────────────────────────────────────────────────
def read_records(path: Path, report: Report) -> Iterator[tuple[str, Any]]:
    """Each record of ``path`` with where it is; JSON lines that cannot be decoded are reported.

    A JSON list or parquet file that cannot be decoded at all raises, whatever ``strict`` says.
    """
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    if _is_json_list(path, opener):
        yield from _json_list(path, opener)
        return
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = _json_value(raw.rstrip(b"\r\n"))
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


# ── one record, one conversation: messages, ChatML, guanaco ──────────────────────────
def _add_records(path: Path, parse: Callable[[Any], list[dict]], result: Conversations, report: Report):
    for where, record in read_records(path, report):
        try:
            messages = _conversation(parse(record))
        except DataError as error:
            report(where, error)
            continue
        result.conversations.append(messages)


def _conversation(messages: list[dict]) -> list[dict]:
    """``messages`` checked by ``validate_messages`` and cut back to end on its last assistant turn."""
    try:
        validate_messages(messages)
    except ValueError as error:
        raise DataError("invalid message", str(error)) from None
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("no assistant turn", "no assistant turn, so nothing to learn")
    return messages[: last + 1]


def _messages_record(record: Any) -> list[dict]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        raw_messages, role_key, content_key = record["messages"], "role", "content"
    elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
        raw_messages, role_key, content_key = record["conversations"], "from", "value"
    else:
        raise DataError("no messages list", "no 'messages' (or ShareGPT 'conversations') list in the record")
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise DataError(
                "invalid message", f"message {index}: expected an object, got {type(message).__name__}"
            )
        role = message.get(role_key)
        if role_key == "from" and isinstance(role, str):
            role = _SHAREGPT_ROLES.get(role, role)
        messages.append({"role": role, "content": message.get(content_key)})
    return messages


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


_RECORD_PARSERS = {"messages": _messages_record, "oasst_top1": _chatml_record, "guanaco": _guanaco_record}


# ── OpenAssistant trees: many records, many threads (data.oasst) ─────────────────────
def _add_tree_threads(path: Path, format: str, result: Conversations, report: Report, languages, threads):
    roots, left_out = read_trees(path, format, result, report)
    result.conversations += oasst.conversations(roots, languages, threads, left_out)


def read_trees(
    path: Path, format: str, result: ReadResult, report: Report
) -> tuple[list[oasst.Message], oasst.LeftOut]:
    """The trees of an OpenAssistant export (``format`` in TREE_FORMATS), not yet pruned, and the
    ``left_out`` callback for ``data.oasst``: by-design reasons are counted on ``result``, never raised."""

    def left_out(where: str, reason: str, detail: str) -> None:
        if reason in oasst.BY_DESIGN:  # counted, but no error even in strict mode
            result.drop(where, reason, detail)
        else:
            report(where, DataError(reason, detail))

    read_roots = oasst.flat_roots if format == "oasst_messages" else oasst.nested_roots
    return read_roots(read_records(path, report), left_out), left_out
