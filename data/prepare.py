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

from data import held_out
from data.cache import atomic_directory, cache_entry
from data.chat import chat_format_of
from data.preference import load_preferences, unpaired
from data.readers import DataError, ReadResult, check_messages_field, checked_file, load_conversations
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


def prepare_from_config(data, tokenizer, *, max_length: int, objective: str = "sft", seed: int = 0):
    """The prepared training rows, the evaluation rows (None without ``data.eval_split``/``eval_path``) and
    the summary, for a ``data`` config node (``data.config.DataConfig``): chats for ``objective="sft"``
    (``prepare_dataset``), preference rows for ``dpo``/``kto`` (``prepare_preferences``). Held-out rows are
    split by conversation group with ``seed`` (``data.held_out``); an ``eval_path`` is prepared as the
    training source is, in its own format (``eval_format``, default ``format``), and cached the same way."""
    check_messages_field(data.format, data.messages_field)
    if data.eval_split and data.eval_path:
        raise DataError(
            "two eval sets",
            "data.eval_split and data.eval_path are both set: hold out a part, or name a file",
        )

    def prepared(path, format, with_groups=False):
        if objective == "sft":
            return prepare_dataset(
                path, format, tokenizer, max_length=max_length, overflow=data.overflow, lang=data.lang,
                threads=data.threads, strict=data.strict, num_proc=data.num_proc, cache_dir=data.cache_dir,
                with_groups=with_groups, messages_field=data.messages_field,
            )  # fmt: skip
        return prepare_preferences(
            path, format, tokenizer, objective=objective, max_length=max_length,
            overflow=data.overflow, lang=data.lang, pairs_per_prompt=data.pairs_per_prompt,
            min_rank_gap=data.min_rank_gap, strict=data.strict, cache_dir=data.cache_dir,
            with_groups=with_groups,
        )  # fmt: skip

    if data.eval_path:
        evaluated, eval_summary = prepared(data.eval_path, data.eval_format or data.format)
        dataset, summary = prepared(data.path, data.format)
        summary.held_out = f"evaluation: {eval_summary.source}, {len(evaluated)} rows"
        return dataset, evaluated, summary
    dataset, summary = prepared(data.path, data.format, with_groups=bool(data.eval_split))
    if not data.eval_split:
        return dataset, None, summary
    dataset, evaluated, summary.held_out = held_out.split(dataset, data.eval_split, seed, str(data.path))
    return dataset, evaluated, summary


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
    with_groups: bool = False,
    messages_field: str | None = None,
) -> tuple[Dataset, PrepareSummary]:
    """Chats as ``input_ids`` + ``assistant_masks``: loaded from the cache, or read, encoded, saved there.
    ``with_groups``: with the ``group`` column too (``data.held_out``; it is in the cache either way).
    ``messages_field``: the key of a record's message list (``data.messages_field``)."""
    check_settings(overflow)
    settings = {
        "format": format, "lang": lang, "threads": threads, "strict": strict, "max_length": max_length,
        "overflow": overflow, "encoder": ENCODER_VERSION,
        **({"messages_field": messages_field} if messages_field is not None else {}),
    }  # fmt: skip
    checked_file(Path(path))
    target = cache_entry(Path(path), tokenizer, settings, cache_dir)
    if not (cached := _from_cache(target, PrepareSummary, path)):
        source = load_conversations(
            path, format, lang=lang, threads=threads, strict=strict, messages_field=messages_field,
            chat_format=chat_format_of(tokenizer),
        )  # fmt: skip
        groups = [held_out.group_of(conversation) for conversation in source.conversations]
        dataset, summary = encode_conversations(
            source.conversations, tokenizer, max_length=max_length, overflow=overflow, num_proc=num_proc,
            groups=groups, options=source.options,
        )  # fmt: skip
        cached = _saved(target, path, source, dataset, summary, rows="conversation")
    return _groups_kept(*cached, with_groups)


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
    with_groups: bool = False,
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
    if not (cached := _from_cache(target, PreferenceSummary, path)):
        source = load_preferences(
            path,
            format,
            lang=lang,
            pairs_per_prompt=pairs_per_prompt,
            min_rank_gap=min_rank_gap,
            strict=strict,
        )
        if objective == "kto":
            source = unpaired(source)
        groups = [held_out.group_of(record["prompt"]) for record in source.records]
        dataset, summary = encode_preference_records(
            source.records, tokenizer, objective=objective, max_length=max_length, overflow=overflow,
            groups=groups,
        )  # fmt: skip
        cached = _saved(target, path, source, dataset, summary, rows="preference record")
    return _groups_kept(*cached, with_groups)


def _groups_kept(dataset: Dataset, summary, with_groups: bool):
    return (dataset if with_groups else dataset.remove_columns(held_out.GROUP)), summary


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
    from data.tokenizer import tokenizer_for

    cfg = compose_config(argv)
    model = cfg.model  # keys only train's schema defaults may be absent: .get
    try:
        data = OmegaConf.to_object(cfg.data)
        tokenizer = tokenizer_for(model)
        _, _, summary = prepare_from_config(
            data, tokenizer, max_length=cfg.training.max_length, objective=cfg.stage.name,
            seed=cfg.training.seed,
        )  # fmt: skip
    except (DataError, MissingMandatoryValue) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
