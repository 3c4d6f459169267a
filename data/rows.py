"""Encoded rows: records → the token ids TRL trains on, cut or dropped at ``max_length``, with a summary.

Chats (SFT) become ``input_ids`` and ``assistant_masks``; TRL's SFTTrainer folds the masks into labels
(-100 where 0), so loss falls only on assistant tokens. A cut that would leave no assistant token drops
the conversation.

Preference records become what TRL's own tokenisation would produce, made by our exact encoder instead:

- ``objective="dpo"``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL's DataCollatorForPreference);
- ``objective="kto"``: ``prompt_ids``, ``completion_ids``, ``label`` (DataCollatorForUnpairedPreference);
- ``objective="rm"``: ``chosen_ids``, ``rejected_ids``, each the whole sequence, prompt and completion (TRL's
  RewardTrainer takes such rows as they are: its ``DataCollatorForPreference`` scores each sequence).

``prompt_ids`` end on the assistant header, as the template's generation prompt does, and a completion's
ids are its content and ``<|eot_id|>``, so ``prompt_ids + chosen_ids == encode_chat(prompt + chosen)``.
TRL 1.16 re-tokenises in ``_prepare_dataset`` whatever it is given (trl/trainer/dpo_trainer.py and
kto_trainer.py have no pre-tokenised path), so a trainer that trains on these rows overrides that
method: DPO returns the dataset as it is; KTO adds only its ``KL_completion_ids``.

``max_length`` as TRL 1.16 applies it to preference rows (``DataCollatorForPreference``,
``truncation_mode="keep_start"``, and ``_prepare_dataset``'s filter): a training sequence is prompt + one
completion. With ``overflow="truncate"`` a completion is cut so the sequence fits, and a row whose prompt
alone fills ``max_length`` is dropped (no completion token would be left); with ``"drop"`` a row with any
sequence over ``max_length`` is dropped. Cutting here rather than in the collator keeps the counts in the
summary true, and leaves the collator's own cut nothing to do. A pair whose chosen and rejected are cut
to the same tokens is dropped too.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from data.chat import encode_chats
from data.held_out import GROUP, group_of
from data.sources import DataError
from data.summary import PreferenceSummary, PrepareSummary, length_histogram

OVERFLOW_POLICIES = ("truncate", "drop")
OBJECTIVES = ("dpo", "kto", "rm")  # the preference objectives; sft trains on chats
PAIRED = ("dpo", "rm")  # the objectives that train on pairs
# Part of each prepared dataset's cache key: bumped whenever the readers, encode_chat or the rows written
# here change (chats: ENCODER_VERSION; preference rows: PREFERENCE_VERSION), so stale caches are not reused.
ENCODER_VERSION = "5"  # 5: per-conversation tools/builtin_tools; 4: the group column (data.held_out)
PREFERENCE_VERSION = "2"  # 2: the group column
_CHUNK = 1024  # preference records encoded per batched call into the tokenizer
CONVERSATION = "conversation"  # the column of JSON conversations that chats are encoded from
WRITE_BATCH = 10_000  # conversations per Arrow batch written while a source streams (~20 MB of JSON)


def check_settings(overflow: str, objective: str | None = None) -> None:
    """Fail before reading: an overflow policy, or a preference ``objective`` (None: chats), that the
    encoders here do not have."""
    if objective is not None and objective not in OBJECTIVES:
        raise DataError(
            "invalid setting", f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    if overflow not in OVERFLOW_POLICIES:
        raise DataError(
            "invalid setting",
            f"unknown overflow policy {overflow!r}; expected one of {', '.join(OVERFLOW_POLICIES)}",
        )


# ── chats → input_ids + assistant_masks ──────────────────────────────────────────────
def encode_conversations(
    conversations: list[list[dict]] | Written,
    tokenizer,
    *,
    max_length: int,
    overflow: str = "truncate",
    num_proc: int = 1,
    groups: list[int] | None = None,
    options: list[dict] | None = None,
) -> tuple[Dataset, PrepareSummary]:
    """Encode conversations into ``input_ids`` + ``assistant_masks``; cut or drop those over ``max_length``.

    A cut that would leave no assistant token to learn drops the conversation (counted),
    never keeps a row that only costs compute. ``groups`` (one per conversation, ``data.held_out``)
    become a ``group`` column, for a held-out split of the rows kept. ``options`` (one per conversation,
    ``Conversations.options``) are what ``encode_chat`` takes besides the messages: ``tools``,
    ``builtin_tools``; the encoder raises on a conversation it refuses, so check them first (the readers do).
    Conversations ``Written`` to disk already (``write_conversations``: a source of any size, with its
    groups and options) are encoded to files beside theirs, and the summary is counted on Arrow columns,
    so neither rows nor per-row Python lists of the whole source are held in memory.
    """
    check_settings(overflow)
    if isinstance(conversations, Written):
        return _encoded_rows(conversations, tokenizer, max_length, overflow, num_proc)
    options = options if options is not None else [{}] * len(conversations)
    texts = [_conversation_text(c, o) for c, o in zip(conversations, options, strict=True)]
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    columns = {CONVERSATION: texts, **({GROUP: groups} if groups is not None else {})}
    written = Written(Dataset.from_dict(columns), digest.hexdigest())
    return _encoded_rows(written, tokenizer, max_length, overflow, num_proc)


@dataclass(frozen=True)
class Written:
    """Conversations as rows of JSON text (column ``conversation``, and ``group`` when given), and a digest
    of their text, which names the encoding's output (``encode_conversations``)."""

    dataset: Dataset
    digest: str


def write_conversations(
    conversations: Iterable[tuple[list[dict], dict]], path: Path, *, with_groups: bool
) -> Written:
    """``conversations`` (each with its ``encode_chat`` options) written to the Arrow file ``path`` as they
    come, ``WRITE_BATCH`` at a time, so a source of any size holds one batch in memory; the file is read
    back memory-mapped. ``with_groups``: with each one's ``group`` (``data.held_out.group_of``)."""
    schema = pa.schema([(CONVERSATION, pa.string()), *([(GROUP, pa.int64())] if with_groups else [])])
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    conversations = iter(conversations)
    with pa.OSFile(str(path), "wb") as file, pa.ipc.new_stream(file, schema) as writer:
        while batch := list(itertools.islice(conversations, WRITE_BATCH)):
            texts = [_conversation_text(messages, options) for messages, options in batch]
            for text in texts:
                digest.update(text.encode())
            columns = [pa.array(texts, pa.string())]
            if with_groups:
                columns.append(pa.array([group_of(messages) for messages, _ in batch], pa.int64()))
            writer.write_batch(pa.record_batch(columns, schema=schema))
    return Written(Dataset.from_file(str(path)), digest.hexdigest())


def _conversation_text(messages: list[dict], options: dict) -> str:
    return json.dumps({"messages": messages, **options}, ensure_ascii=False)


def _encoded_rows(
    written: Written, tokenizer, max_length: int, overflow: str, num_proc: int
) -> tuple[Dataset, PrepareSummary]:
    source = written.dataset.with_format("arrow")
    with_groups = GROUP in source.column_names
    # Our own fingerprint: datasets would otherwise pickle and hash the whole tokenizer.
    fingerprint = hashlib.sha256(
        f"{ENCODER_VERSION} {max_length} {overflow} {with_groups} {written.digest}".encode()
    )
    with _children_die_with_this_process():
        encoded = source.map(
            _encode_batch,
            batched=True,
            num_proc=num_proc if len(source) >= 2 * num_proc > 2 else None,
            remove_columns=[CONVERSATION],
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "overflow": overflow},
            desc="Encoding Llama 3.1 chats",
            new_fingerprint=fingerprint.hexdigest()[:16],
        ).with_format(None)
    columns = encoded.with_format("arrow").select_columns(["status", "length", "trainable", "full_length"])[:]
    status = columns["status"]
    is_kept = pc.is_in(status, value_set=pa.array(["ok", "truncated"]))
    kept = pc.indices_nonzero(is_kept).cast(pa.int64()).to_numpy()
    dropped = pc.value_counts(pc.filter(status, pc.invert(is_kept))).to_pylist()
    summary = PrepareSummary(
        source="",
        conversations=len(kept),
        tokens=pc.sum(pc.filter(columns["length"], is_kept)).as_py() or 0,
        trainable_tokens=pc.sum(pc.filter(columns["trainable"], is_kept)).as_py() or 0,
        truncated=pc.sum(pc.equal(status, "truncated")).as_py() or 0,
        dropped={count["values"]: count["counts"] for count in dropped},
        length_histogram=length_histogram(columns["full_length"].to_numpy(), max_length),
    )
    if len(kept) < len(encoded):
        encoded = encoded.select(kept)
    return encoded.remove_columns(["status", "full_length", "length", "trainable"]), summary


def _encode_batch(batch: pa.Table, tokenizer, max_length: int, overflow: str) -> pa.Table:
    """Encode a batch of JSON conversations; returns Arrow columns built without per-token Python objects."""
    records = [json.loads(conversation) for conversation in batch.column(CONVERSATION).to_pylist()]
    ids_flat, masks_flat, offsets = [], [], [0]
    full_length, length, trainable, status = [], [], [], []
    for encoded in _encoded(records, tokenizer):
        ids, masks, verdict = encoded["input_ids"], encoded["assistant_masks"], "ok"
        if len(ids) > max_length:
            if overflow == "drop":
                verdict = f"longer than max_length={max_length}"
            elif not any(masks[:max_length]):
                verdict = f"no assistant token within max_length={max_length}"
            else:
                ids, masks, verdict = ids[:max_length], masks[:max_length], "truncated"
        full_length.append(len(encoded["input_ids"]))
        length.append(len(ids))
        trainable.append(sum(masks))
        status.append(verdict)
        ids_flat += ids
        masks_flat += masks
        offsets.append(len(ids_flat))
    offsets = pa.array(offsets, pa.int32())
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids_flat, pa.int32())),
        "assistant_masks": pa.ListArray.from_arrays(offsets, pa.array(masks_flat, pa.int8())),
        "full_length": pa.array(full_length, pa.int32()),
        "length": pa.array(length, pa.int32()),
        "trainable": pa.array(trainable, pa.int32()),
        "status": pa.array(status, pa.string()),
    }
    if GROUP in batch.column_names:  # a returned table replaces the batch: carry the groups over
        columns[GROUP] = batch.column(GROUP)
    return pa.table(columns)


def _encoded(records: list[dict], tokenizer) -> list[dict]:
    """``encode_chats`` of each ``{"messages", **options}`` record, in order: records with the same options
    (most often none) go through one batched call."""
    by_options: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        options = {key: value for key, value in record.items() if key != "messages"}
        # not sort_keys: a tool schema's key order is part of the tokens (the template's tojson keeps it)
        by_options.setdefault(json.dumps(options, ensure_ascii=False), []).append(index)
    encoded: list[dict] = [{}] * len(records)
    for key, indices in by_options.items():
        dialogs = [records[index]["messages"] for index in indices]
        for index, result in zip(indices, encode_chats(dialogs, tokenizer, **json.loads(key)), strict=True):
            encoded[index] = result
    return encoded


# ── the encoding processes die with the process that started them ────────────────────────
# map(num_proc=...) forks a multiprocess Pool, then a Manager for its results (datasets 5.2
# arrow_dataset.py `with mp.Pool(num_proc)`, utils/py_utils.py iflatmap_unordered `pool._ctx.Manager()`),
# and nothing in them watches their parent: after a SIGKILL of the parent, the Manager (forked after the
# Pool, so holding the write end of the Pool's task pipe) serves forever, and the workers wait forever
# for a task on that pipe (multiprocess/pool.py worker, queues.py SimpleQueue.get). A SIGKILL cannot be
# caught, so each child asks Linux to kill it when its parent dies: prctl(PR_SET_PDEATHSIG, SIGKILL).
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl = None  # libc's prctl, looked up before any fork; None until first needed, and off Linux
_parent: int | None = None  # while children must die with it: the pid of the process forking them


@contextmanager
def _children_die_with_this_process() -> Iterator[None]:
    """Every process forked in this block (datasets' pool workers and its manager, and their own
    children) is killed by the kernel when the process that forked it dies, however it dies.

    Linux only (PR_SET_PDEATHSIG); elsewhere this does nothing. The signal follows the *thread* that
    forked: a child forked by a thread that ends before the process would die with that thread.
    """
    global _parent, _prctl
    if not sys.platform.startswith("linux"):
        yield
        return
    if _prctl is None:  # once per process, in the parent: no library lookup after a fork
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
        os.register_at_fork(after_in_child=_die_with_parent)
    outer, _parent = _parent, os.getpid()
    try:
        yield
    finally:
        _parent = outer


def _die_with_parent() -> None:
    """In a child just forked: SIGKILL when the parent dies; exit now if it died before this asked."""
    global _parent
    if _parent is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent:  # reparented already: the parent died first, no signal will come
        os._exit(1)
    _parent = os.getpid()  # the children this one forks die with it in turn


# ── one preference record → token ids ────────────────────────────────────────────────
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


# ── preference records → dataset ─────────────────────────────────────────────────────
def encode_preference_records(
    records: Sequence[Mapping],
    tokenizer,
    *,
    objective: str,
    max_length: int,
    overflow: str = "truncate",
    groups: list[int] | None = None,
) -> tuple[Dataset, PreferenceSummary]:
    """Encode records into the rows of ``objective`` (see the module); cut or drop rows over max_length.
    ``groups`` (one per record, ``data.held_out``) become a ``group`` column of the rows kept."""
    check_settings(overflow, objective)
    completions = ("chosen", "rejected") if objective in PAIRED else ("completion",)
    if records and completions[0] not in records[0]:
        raise ValueError(f"{objective} needs records with {', '.join(completions)}; unpair pairs for kto")
    columns: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in completions}, "label": []}
    kept_groups = []
    summary, dropped, full_lengths = PreferenceSummary(source="", objective=objective), Counter(), []
    for start in range(0, len(records), _CHUNK):
        for offset, row in enumerate(encode_preferences(records[start : start + _CHUNK], tokenizer)):
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
            if groups is not None:
                kept_groups.append(groups[start + offset])
            summary.prompt_tokens += len(prompt)
            summary.completion_tokens += sum(map(len, ids))
    summary.rows = len(columns["prompt_ids"])
    summary.desirable = sum(label is True for label in columns["label"])
    summary.dropped = dict(dropped.most_common())
    summary.length_histogram = length_histogram(full_lengths, max_length)
    table = {
        name: pa.array(values, pa.list_(pa.int32())) for name, values in columns.items() if name != "label"
    }
    if objective == "kto":
        table["label"] = pa.array(columns["label"], pa.bool_())
    if objective == "rm":  # whole sequences: prompt + completion
        del table["prompt_ids"]
        for name in completions:
            table[f"{name}_ids"] = pa.array(
                [p + c for p, c in zip(columns["prompt_ids"], columns[f"{name}_ids"], strict=True)],
                pa.list_(pa.int32()),
            )
    if groups is not None:
        table[GROUP] = pa.array(kept_groups, pa.int64())
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
