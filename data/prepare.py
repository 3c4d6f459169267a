"""Prepare: a chat source → a tokenized, masked dataset on disk, cached, with a summary.

The dataset has ``input_ids`` and ``assistant_masks``; TRL's SFTTrainer folds the masks
into labels (-100 where 0), so loss falls only on assistant tokens. The result is saved
with datasets' ``save_to_disk`` under a key of the source's bytes, the tokenizer and the
encoder settings, so a second run (or every rank of a multi-GPU job) loads it at once.

    python -m data.prepare data=oasst1_sample training.max_length=2048

The command composes the same configs as ``python -m train``, so the cache it fills is
the one training reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, load_from_disk

from data.cache import atomic_directory, source_sha256
from data.cache import cache_dir as default_cache
from data.chat import encode_chats
from data.readers import checked_file, load_conversations

OVERFLOW_POLICIES = ("truncate", "drop")
# Bumped whenever the readers, encode_chat or the rows written here change, so stale caches are not reused.
ENCODER_VERSION = "3"
SUMMARY_FILE = "summary.json"

log = logging.getLogger(__name__)


@dataclass
class PrepareSummary:
    """What prepare made of a source: counts, drops by reason, and a length histogram."""

    source: str
    conversations: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    length_histogram: dict[str, int] = field(default_factory=dict)
    path: str = ""

    def __str__(self) -> str:
        lines = [
            f"{self.source}",
            f"  {self.conversations} conversations, {self.tokens:,} tokens, "
            f"{self.trainable_tokens:,} trainable ({self.trainable_tokens / max(self.tokens, 1):.0%}), "
            f"{self.truncated} truncated",
        ]
        return "\n".join(lines + summary_details(self, "tokens"))


def summary_details(summary, lengths: str) -> list[str]:
    """The lines a prepare summary ends with: drops by reason, the first of each, a histogram of
    ``summary.length_histogram`` (``lengths`` says what was measured), and where it was saved."""
    lines = [f"  dropped {count} × {reason}" for reason, count in summary.dropped.items()]
    lines += [f"    e.g. {example}" for example in summary.examples]
    widest = max(summary.length_histogram.values(), default=1)
    lines.append(f"  length ({lengths}, before truncation):")
    lines += [
        f"    {bucket:>13} {count:>7} {'█' * round(30 * count / widest)}"
        for bucket, count in summary.length_histogram.items()
    ]
    if summary.path:
        lines.append(f"  saved in {summary.path}")
    return lines


def encode_conversations(
    conversations: list[list[dict]],
    tokenizer,
    *,
    max_length: int,
    overflow: str = "truncate",
    num_proc: int = 1,
) -> tuple[Dataset, PrepareSummary]:
    """Encode conversations into ``input_ids`` + ``assistant_masks``; cut or drop those over ``max_length``.

    A cut that would leave no assistant token to learn drops the conversation (counted),
    never keeps a row that only costs compute.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(
            f"unknown overflow policy {overflow!r}; expected one of {', '.join(OVERFLOW_POLICIES)}"
        )
    texts = [json.dumps(c, ensure_ascii=False) for c in conversations]
    # Our own fingerprint: datasets would otherwise pickle and hash the whole tokenizer.
    fingerprint = hashlib.sha256(f"{ENCODER_VERSION} {max_length} {overflow}".encode())
    for text in texts:
        fingerprint.update(text.encode())
    encoded = Dataset.from_dict({"conversation": texts}).with_format("arrow")
    encoded = encoded.map(
        _encode_batch,
        batched=True,
        num_proc=num_proc if len(texts) >= 2 * num_proc > 2 else None,
        remove_columns=["conversation"],
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "overflow": overflow},
        desc="Encoding Llama 3.1 chats",
        new_fingerprint=fingerprint.hexdigest()[:16],
    ).with_format(None)
    columns = encoded.select_columns(["status", "length", "trainable", "full_length"]).to_dict()
    status, lengths, trainable = columns["status"], columns["length"], columns["trainable"]
    kept = [index for index, s in enumerate(status) if s in ("ok", "truncated")]
    summary = PrepareSummary(
        source="",
        conversations=len(kept),
        tokens=sum(lengths[i] for i in kept),
        trainable_tokens=sum(trainable[i] for i in kept),
        truncated=status.count("truncated"),
        dropped=dict(Counter(s for s in status if s not in ("ok", "truncated"))),
        length_histogram=_histogram(columns["full_length"], max_length),
    )
    if len(kept) < len(encoded):
        encoded = encoded.select(kept)
    return encoded.remove_columns(["status", "full_length", "length", "trainable"]), summary


def _encode_batch(batch: pa.Table, tokenizer, max_length: int, overflow: str) -> pa.Table:
    """Encode a batch of JSON conversations; returns Arrow columns built without per-token Python objects."""
    dialogs = [json.loads(conversation) for conversation in batch.column("conversation").to_pylist()]
    ids_flat, masks_flat, offsets = [], [], [0]
    full_length, length, trainable, status = [], [], [], []
    for encoded in encode_chats(dialogs, tokenizer):
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
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids_flat, pa.int32())),
            "assistant_masks": pa.ListArray.from_arrays(offsets, pa.array(masks_flat, pa.int8())),
            "full_length": pa.array(full_length, pa.int32()),
            "length": pa.array(length, pa.int32()),
            "trainable": pa.array(trainable, pa.int32()),
            "status": pa.array(status, pa.string()),
        }
    )


def _histogram(lengths: list[int], max_length: int) -> dict[str, int]:
    """Counts per power-of-two bucket, with everything over max_length in its own bucket."""
    bounds = [2**k for k in range(5, 32) if 2**k < max_length] + [max_length]
    counts = Counter()
    for length in lengths:
        upper = next((b for b in bounds if length <= b), None)
        counts[f"≤{upper}" if upper else f">{max_length}"] += 1
    order = [f"≤{b}" for b in bounds] + [f">{max_length}"]
    return {bucket: counts[bucket] for bucket in order if counts[bucket]}


# ── the cached dataset that training reads ───────────────────────────────────────────
def prepare_dataset(
    path: str | os.PathLike,
    format: str,
    tokenizer,
    *,
    max_length: int,
    overflow: str = "truncate",
    lang: list[str] | None = None,
    threads: str = "best",
    strict: bool = False,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Dataset, PrepareSummary]:
    """The prepared dataset for a source: loaded from the cache, or read, encoded and saved there."""
    settings = {
        "format": format, "lang": lang, "threads": threads, "strict": strict, "max_length": max_length,
        "overflow": overflow, "encoder": ENCODER_VERSION,
    }  # fmt: skip
    checked_file(Path(path))
    target = cache_entry(Path(path), tokenizer, settings, cache_dir)

    def read_and_encode():
        source = load_conversations(path, format, lang=lang, threads=threads, strict=strict)
        encoded = encode_conversations(
            source.conversations, tokenizer, max_length=max_length, overflow=overflow, num_proc=num_proc
        )
        return source, *encoded

    return cached_prepare(target, PrepareSummary, read_and_encode, source=str(path), rows="conversation")


def cache_entry(
    path: Path, tokenizer, settings: dict, cache_dir: str | os.PathLike | None = None, *, kind: str = ""
) -> Path:
    """Where a source prepared with ``settings`` is cached: ``<cache>/<file stem>[-kind]-<key>``, the key a
    hash of the source's bytes (hashed once per file version, ``data.cache.source_sha256``), the tokenizer
    and the settings."""
    cache = Path(cache_dir or default_cache("datasets"))
    key = hashlib.sha256(source_sha256(path, cache).encode())
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(json.dumps(settings, sort_keys=True).encode())
    return cache / "-".join([path.name.split(".")[0], *([kind] if kind else []), key.hexdigest()[:16]])


def cached_prepare(target: Path, summary_type: type, read_and_encode: Callable, *, source: str, rows: str):
    """The dataset and summary cached in ``target``, or else what ``read_and_encode()`` makes, saved there.

    ``read_and_encode`` returns the reader's result (its left-out records go into the summary), the dataset
    and its summary. The summary names ``source`` (the path given in this run) and ``target``, whoever
    filled the cache. No row left is an error, naming what a row is (``rows``).
    """
    if (target / SUMMARY_FILE).exists():
        log.info("prepared data from the cache: %s", target)
        summary = summary_type(**json.loads((target / SUMMARY_FILE).read_text()))
        summary.source, summary.path = source, str(target)
        return load_from_disk(str(target)), summary
    log.info("preparing %s: not in the cache yet (%s)", source, target)
    read, dataset, summary = read_and_encode()
    summary.source = source
    summary.dropped = {**dict(read.dropped.most_common()), **summary.dropped}
    summary.examples = read.examples
    if not len(dataset):
        raise ValueError(f"{source}: no usable {rows} left\n{summary}")
    summary.path = str(target)
    with atomic_directory(target) as scratch:
        dataset.save_to_disk(str(scratch))
        (scratch / SUMMARY_FILE).write_text(json.dumps(asdict(summary), ensure_ascii=False, indent=1))
    return dataset, summary


def prepare_from_config(data, tokenizer, *, max_length: int, objective: str = "sft"):
    """The prepared dataset for a ``data`` config node (path, format, overflow, lang, threads, strict, ...):
    chats for ``objective="sft"`` (``prepare_dataset``), preference rows for ``dpo``/``kto``
    (``data.prepare_preference.prepare_preferences``)."""
    if objective != "sft":
        from data.prepare_preference import prepare_preferences  # it builds on this module

        return prepare_preferences(
            data.path, data.format, tokenizer, objective=objective, max_length=max_length,
            overflow=data.overflow, lang=data.lang, pairs_per_prompt=data.pairs_per_prompt,
            min_rank_gap=data.min_rank_gap, strict=data.strict, cache_dir=data.cache_dir,
        )  # fmt: skip
    return prepare_dataset(
        data.path, data.format, tokenizer, max_length=max_length, overflow=data.overflow, lang=data.lang,
        threads=data.threads, strict=data.strict, num_proc=data.num_proc, cache_dir=data.cache_dir,
    )  # fmt: skip


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the tokenizer.json it was loaded from (cheap),
    else its serialised backend, plus the chat template."""
    saved = Path(str(tokenizer.name_or_path)) / "tokenizer.json"
    content = saved.read_bytes() if saved.is_file() else tokenizer.backend_tokenizer.to_str().encode()
    return hashlib.sha256(content + (tokenizer.chat_template or "").encode()).hexdigest()


# ── python -m data.prepare ─────────────────────────────────────────────────────────────
def main(argv: list[str]) -> int:
    """Compose the project's configs with ``argv`` as overrides, prepare, print the summary."""
    # The CLI composes the same config tree as training (its schema lives in train.config);
    # the functions above stay free of train, so notebooks can use them alone.
    from data.tokenizer import load_tokenizer
    from train.config import ConfigError, compose_config, load_config

    cfg = compose_config(argv)
    try:
        config = load_config(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.path)
    _, summary = prepare_from_config(
        config.data, tokenizer, max_length=config.training.max_length, objective=config.stage.name
    )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
