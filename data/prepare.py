"""Conversations → a tokenized, masked dataset that TRL's SFTTrainer consumes as is.

The dataset has ``input_ids`` and ``assistant_masks``; SFTTrainer folds the masks into
labels (-100 where 0), so loss falls only on assistant tokens. Caching, packing, the
multiprocess map and ``python -m data.prepare`` come with the data-module issue.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset

from data.chat import encode_chat

OVERFLOW_POLICIES = ("truncate", "drop")


@dataclass
class EncodedStats:
    conversations: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (
            f"{self.conversations} conversations, {self.tokens} tokens, {self.trainable_tokens} trainable, "
            f"{self.truncated} truncated, dropped: {dropped}"
        )


def encode_conversations(
    conversations: list[list[dict]], tokenizer, *, max_length: int, overflow: str = "truncate"
) -> tuple[Dataset, EncodedStats]:
    """Encode every conversation; cut or drop those over ``max_length`` tokens.

    A cut that would leave no assistant token to learn drops the conversation (counted)
    instead of keeping a row that only costs compute.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(
            f"unknown overflow policy {overflow!r}; expected one of {', '.join(OVERFLOW_POLICIES)}"
        )
    stats = EncodedStats()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    for messages in conversations:
        encoded = encode_chat(messages, tokenizer)
        if len(encoded["input_ids"]) > max_length:
            if overflow == "drop":
                stats.dropped[f"longer than max_length={max_length}"] += 1
                continue
            encoded = {key: ids[:max_length] for key, ids in encoded.items()}
            if not any(encoded["assistant_masks"]):
                stats.dropped[f"no assistant token within max_length={max_length}"] += 1
                continue
            stats.truncated += 1
        stats.conversations += 1
        stats.tokens += len(encoded["input_ids"])
        stats.trainable_tokens += sum(encoded["assistant_masks"])
        for key in rows:
            rows[key].append(encoded[key])
    if not rows["input_ids"]:
        raise ValueError(f"no usable conversation left ({stats.summary()})")
    return Dataset.from_dict(rows), stats
