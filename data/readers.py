"""Readers: local chat files → conversations (lists of message dicts).

Every record that is skipped is counted by reason, and the first few are named by
file:line, so nothing disappears silently; ``strict=True`` raises on the first one.
The OpenAssistant tree, ChatML and guanaco readers come with the data-module issue.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data.chat import validate_messages

FORMATS = ("messages",)
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_EXAMPLES_KEPT = 5


class DataError(ValueError):
    """A record or file that cannot be used; the message names file, line and fix."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


@dataclass
class Conversations:
    """What a reader produced: the conversations, and what it dropped and why."""

    source: str
    conversations: list[list[dict]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def drop(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(f"{where}: {detail}")

    def summary(self) -> str:
        lines = [
            f"{self.source}: {len(self.conversations)} conversations, {sum(self.dropped.values())} dropped"
        ]
        lines += [f"  dropped {count} × {reason}" for reason, count in self.dropped.most_common()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def load_conversations(path: str | Path, format: str = "messages", *, strict: bool = False) -> Conversations:
    """Read ``path`` (JSONL, optionally .gz) in ``format`` into conversations.

    ``messages``: one JSON object per line with a ``messages`` list of ``{role, content}``
    (TRL's conversational shape), or ShareGPT's ``conversations`` list of ``{from, value}``.
    """
    path = Path(path)
    if format not in FORMATS:
        raise DataError(
            "unknown format", f"{path}: unknown data format {format!r}; expected one of {', '.join(FORMATS)}"
        )
    if not path.is_file():
        raise DataError("missing file", f"{path}: no such file; set data.path to a local file")
    result = Conversations(source=str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                messages = _messages_record(raw)
            except DataError as error:
                if strict:
                    raise DataError(
                        f"{path}:{number}: {error.detail} (fix the record, or set "
                        "data.strict=false to skip and count such records)"
                    ) from None
                result.drop(f"{path}:{number}", error.reason, error.detail)
                continue
            result.conversations.append(messages)
    return result


def _messages_record(raw: bytes) -> list[dict]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError("not UTF-8", f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError("malformed JSON", f"malformed JSON ({error.msg}, column {error.colno})") from None
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
        messages.append(
            {
                "role": _SHAREGPT_ROLES.get(role, role) if role_key == "from" else role,
                "content": message.get(content_key),
            }
        )
    try:
        validate_messages(messages)
    except ValueError as error:
        raise DataError("invalid message", str(error)) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn", "no assistant turn, so nothing to learn")
    return messages
