"""Held-out rows for evaluation (``data.eval_split``): split off a prepared dataset by conversation group,
the same for a given seed wherever and however often it runs.

A group is every conversation, or preference row, that opens with the same user message. An OpenAssistant
tree's threads all start at its root prompt, and so do the pairs mined from it: a tree is held out whole,
and no thread of an evaluated tree is trained on. In a flat file each record is its own group, unless
records repeat a first prompt (then they go together, so a duplicate cannot leak into training).
"""

from __future__ import annotations

import hashlib
import random

from datasets import Dataset

from data.sources import DataError

GROUP = "group"  # the column prepare adds to a cached dataset: the group of each row


def group_of(messages: list[dict]) -> int:
    """A row's group: a 63-bit hash of its first user message (so it fits Arrow's int64)."""
    first = next((message["content"] for message in messages if message["role"] == "user"), "")
    return int.from_bytes(hashlib.sha256(first.encode()).digest()[:8], "big") >> 1


def held_out_count(eval_split: float, groups: int, source: str) -> int:
    """How many of ``groups`` go to evaluation: a fraction (0 < eval_split < 1, at least one) or a count."""
    if eval_split < 0 or (eval_split >= 1 and eval_split != int(eval_split)):
        raise DataError(
            "bad eval_split",
            f"data.eval_split={eval_split:g}: give a fraction between 0 and 1 (0.05) or a whole count (20)",
        )
    count = max(1, round(eval_split * groups)) if eval_split < 1 else int(eval_split)
    if count >= groups:
        raise DataError(
            "bad eval_split",
            f"data.eval_split={eval_split:g} holds out {count} of the {groups} conversation groups of "
            f"{source}, leaving nothing to train on; lower it, or give a separate file as data.eval_path",
        )
    return count


def split(dataset: Dataset, eval_split: float, seed: int, source: str) -> tuple[Dataset, Dataset, str]:
    """``dataset`` (with its ``group`` column) as training and evaluation rows, both without the column,
    and a line for the summary. Groups are drawn with ``random.Random(seed)`` from their sorted ids, so the
    split depends on the source and the seed only, not on row order or the process."""
    groups = dataset[GROUP]
    held = held_out_groups(groups, eval_split, seed, source)
    trained, evaluated = split_by_groups(dataset, held)
    line = (
        f"held out for evaluation: {len(evaluated)} of {len(groups)} rows, {len(held)} of {len(set(groups))} "
        f"groups (data.eval_split={eval_split:g}, seed {seed})"
    )
    return trained.remove_columns(GROUP), evaluated.remove_columns(GROUP), line


def held_out_groups(groups: list[int], eval_split: float, seed: int, source: str) -> set[int]:
    """The groups of ``groups`` (one per row) that ``eval_split`` holds out with ``seed`` (see ``split``)."""
    ids = sorted(set(groups))
    count = held_out_count(eval_split, len(ids), source)
    random.Random(seed).shuffle(ids)
    return set(ids[:count])


def split_by_groups(dataset: Dataset, held: set[int]) -> tuple[Dataset, Dataset]:
    """``dataset``'s rows whose group is not in ``held``, and those whose group is; the column kept."""
    groups = dataset[GROUP]
    trained = [row for row, group in enumerate(groups) if group not in held]
    evaluated = [row for row, group in enumerate(groups) if group in held]
    return dataset.select(trained), dataset.select(evaluated)
