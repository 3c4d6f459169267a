"""Prepare: a source → the token rows training reads, cached on disk, with a summary. One pipeline for
every objective: chats for ``sft``, preference rows for ``dpo``/``kto``.

    python -m data.prepare data=oasst1_sample training.max_length=2048

Each objective goes the same way, top to bottom: check the settings; name the cache entry (a key of the
source's bytes, the tokenizer and the settings: ``data.cache``); if it is there, load it; else read the
source into records (``data.readers``: chats; ``data.preference``: pairs or labelled completions), encode
them into rows (``data.rows``), and save rows and summary (``data.summary``) in the entry, so a second run
(or every rank of a multi-GPU job) loads them at once.

The command composes the same config tree as ``python -m train`` (``data.config``), so the cache it fills
is the one training reads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset, load_from_disk

from data.cache import atomic_directory, cache_entry
from data.preference import load_preferences, unpaired
from data.readers import DataError, ReadResult, checked_file, load_conversations
from data.rows import (
    ENCODER_VERSION,
    PREFERENCE_VERSION,
    check_settings,
    encode_conversations,
    encode_preference_records,
)
from data.summary import PreferenceSummary, PrepareSummary

SUMMARY_FILE = "summary.json"

log = logging.getLogger(__name__)


def prepare_from_config(data, tokenizer, *, max_length: int, objective: str = "sft"):
    """The prepared dataset and its summary for a ``data`` config node (``data.config.DataConfig``):
    chats for ``objective="sft"`` (``prepare_dataset``), preference rows for ``dpo``/``kto``
    (``prepare_preferences``)."""
    if objective == "sft":
        return prepare_dataset(
            data.path, data.format, tokenizer, max_length=max_length, overflow=data.overflow, lang=data.lang,
            threads=data.threads, strict=data.strict, num_proc=data.num_proc, cache_dir=data.cache_dir,
        )  # fmt: skip
    return prepare_preferences(
        data.path, data.format, tokenizer, objective=objective, max_length=max_length,
        overflow=data.overflow, lang=data.lang, pairs_per_prompt=data.pairs_per_prompt,
        min_rank_gap=data.min_rank_gap, strict=data.strict, cache_dir=data.cache_dir,
    )  # fmt: skip


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
    """Chats as ``input_ids`` + ``assistant_masks``: loaded from the cache, or read, encoded, saved there."""
    check_settings(overflow)
    settings = {
        "format": format, "lang": lang, "threads": threads, "strict": strict, "max_length": max_length,
        "overflow": overflow, "encoder": ENCODER_VERSION,
    }  # fmt: skip
    checked_file(Path(path))
    target = cache_entry(Path(path), tokenizer, settings, cache_dir)
    if cached := _from_cache(target, PrepareSummary, path):
        return cached
    source = load_conversations(path, format, lang=lang, threads=threads, strict=strict)
    dataset, summary = encode_conversations(
        source.conversations, tokenizer, max_length=max_length, overflow=overflow, num_proc=num_proc
    )
    return _saved(target, path, source, dataset, summary, rows="conversation")


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
    """Preference rows (``data.rows``): loaded from the cache, or read, encoded and saved there.

    ``objective="kto"`` takes pairs too, unpaired as TRL's KTOTrainer would (``data.preference.unpaired``);
    ``objective="dpo"`` needs pairs, so ``format="kto"`` fails before reading.
    """
    check_settings(overflow, objective)
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
    if cached := _from_cache(target, PreferenceSummary, path):
        return cached
    source = load_preferences(
        path, format, lang=lang, pairs_per_prompt=pairs_per_prompt, min_rank_gap=min_rank_gap, strict=strict
    )
    if objective == "kto":
        source = unpaired(source)
    dataset, summary = encode_preference_records(
        source.records, tokenizer, objective=objective, max_length=max_length, overflow=overflow
    )
    return _saved(target, path, source, dataset, summary, rows="preference record")


# ── the cache entry: rows and summary ────────────────────────────────────────────────
def _from_cache(target: Path, summary_type: type, source: str | os.PathLike):
    """The dataset and summary saved in ``target``, or None when it holds none yet. The summary names
    ``source`` (the path given in this run) and ``target``, whoever filled the cache."""
    if not (target / SUMMARY_FILE).exists():
        log.info("preparing %s: not in the cache yet (%s)", source, target)
        return None
    log.info("prepared data from the cache: %s", target)
    summary = summary_type(**json.loads((target / SUMMARY_FILE).read_text()))
    summary.source, summary.path = str(source), str(target)
    return load_from_disk(str(target)), summary


def _saved(
    target: Path, source: str | os.PathLike, read: ReadResult, dataset: Dataset, summary, *, rows: str
):
    """``dataset`` and its summary, which gains the records the reader left out (``read``), saved in
    ``target``. No row left is an error, naming what a row is (``rows``)."""
    summary.source = str(source)
    summary.dropped = {**dict(read.dropped.most_common()), **summary.dropped}
    summary.examples = read.examples
    if not len(dataset):
        raise ValueError(f"{source}: no usable {rows} left\n{summary}")
    summary.path = str(target)
    with atomic_directory(target) as scratch:
        dataset.save_to_disk(str(scratch))
        (scratch / SUMMARY_FILE).write_text(json.dumps(asdict(summary), ensure_ascii=False, indent=1))
    return dataset, summary


# ── python -m data.prepare ─────────────────────────────────────────────────────────────
def main(argv: list[str]) -> int:
    """Compose the project's configs with ``argv`` as overrides, prepare, print the summary."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from data.config import compose_config
    from data.tokenizer import load_tokenizer

    cfg = compose_config(argv)
    model = cfg.model  # keys only train's schema defaults may be absent: .get
    try:
        data = OmegaConf.to_object(cfg.data)
        tokenizer = load_tokenizer(model.get("tokenizer_path") or model.get("path"))
        _, summary = prepare_from_config(
            data, tokenizer, max_length=cfg.training.max_length, objective=cfg.stage.name
        )
    except (DataError, MissingMandatoryValue) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
