"""Prepare preference data: a source → the token ids TRL's DPO/KTO trainers train on, cached, with a summary.

Rows hold what TRL's own tokenisation would produce, made by our exact encoder instead:

- ``objective="dpo"``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL's DataCollatorForPreference);
- ``objective="kto"``: ``prompt_ids``, ``completion_ids``, ``label`` (DataCollatorForUnpairedPreference).

``prompt_ids`` end on the assistant header, as the template's generation prompt does, and a completion's
ids are its content and ``<|eot_id|>``, so ``prompt_ids + chosen_ids == encode_chat(prompt + chosen)``.
TRL 1.16 re-tokenises in ``_prepare_dataset`` whatever it is given (trl/trainer/dpo_trainer.py and
kto_trainer.py have no pre-tokenised path), so a trainer that trains on these rows overrides that
method: DPO returns the dataset as it is; KTO adds only its ``KL_completion_ids``.

``max_length`` as TRL 1.16 applies it (``DataCollatorForPreference``, ``truncation_mode="keep_start"``, and
``_prepare_dataset``'s filter): a training sequence is prompt + one completion. With ``overflow="truncate"``
a completion is cut so the sequence fits, and a row whose prompt alone fills ``max_length`` is dropped (no
completion token would be left); with ``"drop"`` a row with any sequence over ``max_length`` is dropped.
Cutting here rather than in the collator keeps the counts in the summary true, and leaves the collator's
own cut nothing to do. A pair whose chosen and rejected are cut to the same tokens is dropped too.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from datasets import Dataset

from data.chat import encode_chats
from data.preference import Preferences, load_preferences, unpaired
from data.prepare import OVERFLOW_POLICIES, _histogram, cache_entry, cached_prepare, summary_details
from data.readers import DataError, checked_file

OBJECTIVES = ("dpo", "kto")
# Bumped whenever the readers, encode_chat or the rows written here change, so stale caches are not reused.
PREFERENCE_VERSION = "1"
_CHUNK = 1024  # records encoded per batched call into the tokenizer


@dataclass
class PreferenceSummary:
    """What prepare made of a preference source: rows, tokens, drops by reason, and a length histogram."""

    source: str
    objective: str
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    desirable: int = 0  # kto: rows labelled true
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    length_histogram: dict[str, int] = field(default_factory=dict)  # longest sequence of each row
    path: str = ""

    def __str__(self) -> str:
        kind = "pairs" if self.objective == "dpo" else "completions"
        lines = [
            f"{self.source}",
            f"  {self.rows} {kind}, {self.prompt_tokens:,} prompt tokens, "
            f"{self.completion_tokens:,} completion tokens, {self.truncated} truncated",
        ]
        if self.objective == "kto":
            lines.append(f"  {self.desirable} desirable, {self.rows - self.desirable} undesirable")
        return "\n".join(lines + summary_details(self, "tokens of prompt + longest completion"))


# ── one record → token ids ───────────────────────────────────────────────────────────
def encode_preference(record: Mapping, tokenizer) -> dict:
    """A pair → ``prompt_ids``, ``chosen_ids``, ``rejected_ids``; a KTO record → ``prompt_ids``,
    ``completion_ids``, ``label``. Records as ``data.preference`` reads them."""
    return encode_preferences([record], tokenizer)[0]


def encode_preferences(records: Sequence[Mapping], tokenizer) -> list[dict]:
    """``encode_preference`` for many records: all their text goes through one batched tokenizer call.

    Each completion is encoded after its prompt with ``encode_chats`` and split where the final run of
    learned tokens (``assistant_masks``) begins, so the split is exact whatever the tokenizer merges.
    """
    names = [("chosen", "rejected") if "chosen" in record else ("completion",) for record in records]
    dialogs = [
        [*record["prompt"], *record[name]]
        for record, pair in zip(records, names, strict=True)
        for name in pair
    ]
    encoded = iter(encode_chats(dialogs, tokenizer))
    rows = []
    for record, pair in zip(records, names, strict=True):
        row = {}
        for name in pair:
            prompt_ids, completion_ids = _split(next(encoded))
            if row.setdefault("prompt_ids", prompt_ids) != prompt_ids:
                raise ValueError(f"the prompt encodes differently before {name!r}: {record['prompt']!r}")
            row[f"{name}_ids"] = completion_ids
        if "label" in record:
            row["label"] = record["label"]
        rows.append(row)
    return rows


def _split(encoded: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    masks = encoded["assistant_masks"]
    start = len(masks) - masks[::-1].index(0)  # BOS is never learned, so a 0 is always there
    return encoded["input_ids"][:start], encoded["input_ids"][start:]


# ── records → dataset ────────────────────────────────────────────────────────────────
def encode_preference_records(
    records: Sequence[Mapping], tokenizer, *, objective: str, max_length: int, overflow: str = "truncate"
) -> tuple[Dataset, PreferenceSummary]:
    """Encode records into the rows of ``objective`` (see the module); cut or drop rows over max_length."""
    _check_settings(objective, overflow)
    completions = ("chosen", "rejected") if objective == "dpo" else ("completion",)
    if records and completions[0] not in records[0]:
        raise ValueError(f"{objective} needs records with {', '.join(completions)}; unpair pairs for kto")
    columns: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in completions}, "label": []}
    summary, dropped, full_lengths = PreferenceSummary(source="", objective=objective), Counter(), []
    for start in range(0, len(records), _CHUNK):
        for row in encode_preferences(records[start : start + _CHUNK], tokenizer):
            prompt, ids = row["prompt_ids"], [row[f"{name}_ids"] for name in completions]
            longest = len(prompt) + max(map(len, ids))
            full_lengths.append(longest)
            if longest > max_length:
                verdict = _overflow(prompt, ids, max_length, overflow)
                if verdict:
                    dropped[verdict] += 1
                    continue
                ids = [completion[: max_length - len(prompt)] for completion in ids]
                summary.truncated += 1
            columns["prompt_ids"].append(prompt)
            for name, completion in zip(completions, ids, strict=True):
                columns[f"{name}_ids"].append(completion)
            columns["label"].append(row.get("label"))
            summary.prompt_tokens += len(prompt)
            summary.completion_tokens += sum(map(len, ids))
    summary.rows = len(columns["prompt_ids"])
    summary.desirable = sum(label is True for label in columns["label"])
    summary.dropped = dict(dropped.most_common())
    summary.length_histogram = _histogram(full_lengths, max_length)
    table = {
        name: pa.array(values, pa.list_(pa.int32())) for name, values in columns.items() if name != "label"
    }
    if objective == "kto":
        table["label"] = pa.array(columns["label"], pa.bool_())
    return Dataset(pa.table(table)), summary


def _overflow(prompt: list[int], completions: list[list[int]], max_length: int, overflow: str) -> str | None:
    """Why a row over ``max_length`` is dropped, or None when cutting its completions keeps it."""
    if overflow == "drop":
        return f"longer than max_length={max_length}"
    if len(prompt) >= max_length:
        return f"prompt fills max_length={max_length}"
    room = max_length - len(prompt)
    if len(completions) == 2 and completions[0][:room] == completions[1][:room]:
        return f"chosen and rejected identical within max_length={max_length}"
    return None


def _check_settings(objective: str, overflow: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(
            f"unknown overflow policy {overflow!r}; expected one of {', '.join(OVERFLOW_POLICIES)}"
        )


# ── the cached dataset that training reads ───────────────────────────────────────────
def prepare_preferences(
    path: str | os.PathLike,
    format: str,
    tokenizer,
    *,
    objective: str = "dpo",
    max_length: int,
    overflow: str = "truncate",
    lang: list[str] | None = None,
    pairs_per_prompt: int | None = None,
    min_rank_gap: int = 1,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, PreferenceSummary]:
    """The prepared preference dataset for a source: loaded from the cache, or read, encoded and saved there.

    ``objective="kto"`` takes pairs too, unpaired as TRL's KTOTrainer would (``data.preference.unpaired``);
    ``objective="dpo"`` needs pairs, so ``format="kto"`` fails before reading.
    """
    _check_settings(objective, overflow)
    if objective == "dpo" and format == "kto":
        raise DataError(
            "not pairs",
            f"{path}: format 'kto' holds single completions with a label, and DPO trains on pairs; "
            "use a pair format (preference, oasst_messages, oasst_trees) or train KTO",
        )
    settings = {
        "format": format, "objective": objective, "lang": lang, "pairs_per_prompt": pairs_per_prompt,
        "min_rank_gap": min_rank_gap, "strict": strict, "max_length": max_length, "overflow": overflow,
        "version": PREFERENCE_VERSION,
    }  # fmt: skip
    checked_file(Path(path))
    target = cache_entry(Path(path), tokenizer, settings, cache_dir, kind=objective)

    def read_and_encode():
        source: Preferences = load_preferences(
            path,
            format,
            lang=lang,
            pairs_per_prompt=pairs_per_prompt,
            min_rank_gap=min_rank_gap,
            strict=strict,
        )
        if objective == "kto":
            source = unpaired(source)
        encoded = encode_preference_records(
            source.records, tokenizer, objective=objective, max_length=max_length, overflow=overflow
        )
        return source, *encoded

    return cached_prepare(
        target, PreferenceSummary, read_and_encode, source=str(path), rows="preference record"
    )
