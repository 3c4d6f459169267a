"""Prepare: a source → the token rows training reads, cached on disk, with a summary. One pipeline for
every objective: chats for ``sft``, preference rows for ``dpo``/``kto``.

    python -m data.prepare data=oasst1_sample training.max_length=2048

Each objective goes the same way, top to bottom: check the settings; name the cache entry (a key of the
source's bytes, the tokenizer and the settings: ``data.cache``); if it is there, load it; else read the
source into records (``data.readers``: chats; ``data.preference``: pairs or labelled completions), encode
them into rows (``data.rows``), and save rows and summary (``data.summary``) in the entry, so a second run
(or every rank of a multi-GPU job) loads them at once, memory-mapped. Chats stream: the records go to an
Arrow file in the entry's scratch as they are read (with a progress line every ``LOG_EVERY`` seconds), are
encoded from it to files beside it, and counted on Arrow columns, so memory stays flat however large the
source (OpenAssistant trees are read whole first: a thread needs its tree). Preference sources are read
into memory. A mixture (``data.sources``) prepares each source
that way, then chooses rows of the cached datasets by weight (``prepare_mixture``): no source is encoded
again for a new weight.

The command composes the same config tree as ``python -m train`` (``data.config``), so the cache it fills
is the one training reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from data import held_out
from data.cache import atomic_directory, cache_entry
from data.chat import chat_format_of
from data.config import SourceConfig, share, source_problems, sources_of
from data.preference import load_preferences, unpaired
from data.prompts import load_prompts
from data.readers import ReadResult, check_messages_field, load_conversations
from data.rows import (
    ENCODER_VERSION,
    PAIRED,
    PREFERENCE_VERSION,
    check_settings,
    encode_conversations,
    encode_preference_records,
    write_conversations,
)
from data.sources import DataError, Progress, locate_source
from data.summary import MixtureSummary, PreferenceSummary, PrepareSummary, SourceShare

SUMMARY_FILE = "summary.json"
WORK = "work"  # a folder of an entry's scratch: the streamed source and its encoding, removed once saved
LOG_EVERY = 10  # seconds between two progress lines while a source is read

log = logging.getLogger(__name__)


def prepare_from_config(data, tokenizer, *, max_length: int, objective: str = "sft", seed: int = 0):
    """The prepared training rows, the evaluation rows (None without ``data.eval_split``/``eval_path``) and
    the summary, for a ``data`` config node (``data.config.DataConfig``): chats for ``objective="sft"``
    (``prepare_dataset``), preference rows for ``dpo``/``kto`` (``prepare_preferences``). Held-out rows are
    split by conversation group with ``seed`` (``data.held_out``); an ``eval_path`` is prepared as the
    training source is, in its own format (``eval_format``, default ``format``), and cached the same way.
    ``data.sources``: a mixture (``prepare_mixture``)."""
    if problems := source_problems(data):
        raise DataError("invalid sources", "; ".join(problems))
    for _, source in sources_of(data):
        check_messages_field(source.format, source.messages_field)
    held_out_by_source = any(source.eval_split for _, source in sources_of(data))
    if held_out_by_source and data.eval_path:
        raise DataError(
            "two eval sets",
            "data.eval_split and data.eval_path are both set: hold out a part, or name a file",
        )
    if data.eval_path and not (data.eval_format or data.format):
        raise DataError("invalid setting", "data.eval_format: name the format of data.eval_path")
    if data.sources:
        dataset, evaluated, summary = prepare_mixture(
            data, tokenizer, max_length=max_length, objective=objective, seed=seed
        )
    else:
        dataset, summary = _prepared(
            data, tokenizer, max_length, objective, with_groups=bool(data.eval_split)
        )
        evaluated = None
        if data.eval_split:
            dataset, evaluated, summary.held_out = held_out.split(
                dataset, data.eval_split, seed, str(data.path)
            )
    if data.eval_path:
        eval_data = replace(data, path=data.eval_path, format=data.eval_format or data.format, sources=[])
        evaluated, eval_summary = _prepared(eval_data, tokenizer, max_length, objective)
        summary.held_out = f"evaluation: {eval_summary.source}, {len(evaluated)} rows"
    return dataset, evaluated, summary


def _prepared(data, tokenizer, max_length: int, objective: str, with_groups: bool = False):
    """``prepare_dataset`` or ``prepare_preferences`` of ``data.path`` with ``data``'s settings."""
    if objective == "grpo":  # prompts: read whole, not encoded (TRL renders them with the template)
        return load_prompts(
            data.path, data.format, lang=data.lang, threads=data.threads, strict=data.strict,
            messages_field=data.messages_field, chat_format=chat_format_of(tokenizer),
            with_groups=with_groups, tokenizer=tokenizer, max_tokens=max_length,
        )  # fmt: skip
    if objective == "sft":
        return prepare_dataset(
            data.path, data.format, tokenizer, max_length=max_length, overflow=data.overflow, lang=data.lang,
            threads=data.threads, strict=data.strict, num_proc=data.num_proc, cache_dir=data.cache_dir,
            with_groups=with_groups, messages_field=data.messages_field,
        )  # fmt: skip
    return prepare_preferences(
        data.path, data.format, tokenizer, objective=objective, max_length=max_length,
        overflow=data.overflow, lang=data.lang, pairs_per_prompt=data.pairs_per_prompt,
        min_rank_gap=data.min_rank_gap, strict=data.strict, cache_dir=data.cache_dir,
        with_groups=with_groups,
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
    located = locate_source(path)
    target = cache_entry(located.files, tokenizer, settings, cache_dir, name=located.name)
    if not (cached := _from_cache(target, PrepareSummary, path)):
        progress = Progress()
        read = load_conversations(
            path, format, lang=lang, threads=threads, strict=strict, messages_field=messages_field,
            chat_format=chat_format_of(tokenizer), stream=True, progress=progress,
        )  # fmt: skip
        with atomic_directory(target) as scratch:
            # the source streams into an Arrow file in the scratch, is encoded there, and saved beside it
            conversations = _logged(read.stream, progress, path)
            written = write_conversations(conversations, scratch / WORK / "source.arrow", with_groups=True)
            dataset, summary = encode_conversations(
                written, tokenizer, max_length=max_length, overflow=overflow, num_proc=num_proc
            )
            _write_entry(scratch, target, path, read, dataset, summary, rows="conversation")
            shutil.rmtree(scratch / WORK)
        cached = load_from_disk(str(target)), summary
    return _groups_kept(*cached, with_groups)


def _logged(conversations: Iterator, progress: Progress, source) -> Iterator:
    """``conversations``, logging every ``LOG_EVERY`` seconds how many were read, how fast, and the time
    left by the bytes of the source read (``progress``); a source read in less says nothing."""
    start = last = time.monotonic()
    count = 0
    for count, conversation in enumerate(conversations, start=1):
        yield conversation
        if (now := time.monotonic()) - last >= LOG_EVERY:
            last, rate = now, count / (now - start)
            left = ""
            if progress.total and progress.done:
                eta = (progress.total - progress.done) * (now - start) / progress.done
                left = f", {progress.done / 1e6:,.0f} of {progress.total / 1e6:,.0f} MB, ETA {eta:,.0f} s"
            log.info("reading %s: %s conversations, %s/s%s", source, f"{count:,}", f"{rate:,.0f}", left)
    if last > start:  # a source long enough to report on
        log.info("read %s: %s conversations in %.0f s", source, f"{count:,}", time.monotonic() - start)


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
    ``objective="dpo"`` and ``"rm"`` need pairs, so ``format="kto"`` fails before reading.
    """
    check_settings(overflow, objective)
    if objective in PAIRED and format == "kto":
        raise DataError(
            "not pairs",
            f"{path}: format 'kto' holds single completions with a label, and {objective.upper()} trains on "
            "pairs; use a pair format (preference, oasst_messages, oasst_trees) or train KTO",
        )
    settings = {
        "format": format, "objective": objective, "lang": lang, "pairs_per_prompt": pairs_per_prompt,
        "min_rank_gap": min_rank_gap, "strict": strict, "max_length": max_length, "overflow": overflow,
        "version": PREFERENCE_VERSION,
    }  # fmt: skip
    located = locate_source(path)
    target = cache_entry(located.files, tokenizer, settings, cache_dir, kind=objective, name=located.name)
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
    """``dataset`` and its summary saved in ``target`` (``_write_entry``)."""
    with atomic_directory(target) as scratch:
        _write_entry(scratch, target, source, read, dataset, summary, rows=rows)
    return dataset, summary


def _write_entry(
    scratch: Path, target: Path, source: str | os.PathLike, read: ReadResult, dataset: Dataset, summary, *,
    rows: str,
) -> None:  # fmt: skip
    """``dataset`` and its summary, which gains the records the reader left out (``read``), written in
    ``scratch``, the cache entry ``target`` once renamed. No row left is an error, naming what a row is
    (``rows``)."""
    summary.source = str(source)
    summary.dropped = {**dict(read.dropped.most_common()), **summary.dropped}
    summary.examples = read.examples
    if not len(dataset):
        raise ValueError(f"{source}: no usable {rows} left\n{summary}")
    summary.path = str(target)
    dataset.save_to_disk(str(scratch))
    (scratch / SUMMARY_FILE).write_text(json.dumps(asdict(summary), ensure_ascii=False, indent=1))


# ── mixtures: each source prepared (and cached) alone, then a seeded choice of its rows ──────
def prepare_mixture(data, tokenizer, *, max_length: int, objective: str = "sft", seed: int = 0):
    """The mixture of ``data.sources``: training rows, evaluation rows (None when no source holds any out)
    and a ``MixtureSummary``.

    Each source is prepared exactly as a single ``data.path`` (its own cache entry, keyed by its bytes and
    settings), so a new weight only chooses rows again. Then, in order: each source's ``eval_split`` picks
    its held-out groups (``data.held_out``, with ``seed``); a row of any source whose group is held out by
    any source goes to evaluation, so no evaluated conversation is trained on; the rows left are each
    source's available rows, and ``mixture_counts`` says how many each gives; ``rows_taken`` draws them with
    a generator seeded by ``seed`` and the source's cache entry (its content and settings), so the choice
    is the same on every rank and restart, whatever the order of the list. The mixture is the sources'
    rows in list order (the trainer shuffles)."""
    configs = [source for _, source in sources_of(data)]
    prepared = [_prepared(source, tokenizer, max_length, objective, with_groups=True) for source in configs]
    held: set[int] = set()
    for source, (dataset, _) in zip(configs, prepared, strict=True):
        if source.eval_split:
            held |= held_out.held_out_groups(dataset[held_out.GROUP], source.eval_split, seed, source.path)
    parts = [held_out.split_by_groups(dataset, held) for dataset, _ in prepared]
    counts = mixture_counts(data.sources, [len(trained) for trained, _ in parts])
    chosen, shares = [], []
    for source, (trained, evaluated), (dataset, summary), count in zip(
        data.sources, parts, prepared, counts, strict=True
    ):
        indices, passes = rows_taken(len(trained), count, random.Random(f"{seed} {Path(summary.path).name}"))
        chosen.append(trained.select(indices))
        kept, dropped = len(dataset), sum(summary.dropped.values())
        read = kept + dropped
        shares.append(
            SourceShare(source.path, _weight(source), read, dropped, kept, len(evaluated), count, passes)
        )
    mixed = concatenate_datasets(chosen).remove_columns(held_out.GROUP)
    summary = MixtureSummary(shares, [summary for _, summary in prepared], seed)
    if not held:
        return mixed, None, summary
    evaluated = concatenate_datasets([evaluated for _, evaluated in parts]).remove_columns(held_out.GROUP)
    summary.held_out = (
        f"held out for evaluation: {len(evaluated)} rows, {len(held)} conversation groups (each source's "
        f"eval_split, seed {seed})"
    )
    return mixed, evaluated, summary


def mixture_counts(sources: Sequence[SourceConfig], available: Sequence[int]) -> list[int]:
    """How many rows each source gives a mixture, from its weight and its ``available`` training rows: the
    exact rule is ``data.config.SourceConfig``'s. Raises naming the source when one is asked for more rows
    than it has without ``repeat``."""
    counts = [source.rows if source.rows is not None else available[i] for i, source in enumerate(sources)]
    fractions = {i: share(source) for i, source in enumerate(sources) if source.fraction is not None}
    if fractions:
        fixed = sum(count for i, count in enumerate(counts) if i not in fractions)
        total = sum(fractions.values())
        if len(fractions) < len(sources):
            size = math.floor(Fraction(fixed) / (1 - total) + Fraction(1, 2))
        else:
            limits = [i for i in fractions if not sources[i].repeat] or list(fractions)
            size = min(math.floor(available[i] * total / fractions[i]) for i in limits)
        for i, count in _apportioned(size - fixed, fractions).items():
            counts[i] = count
    for i, (source, count) in enumerate(zip(sources, counts, strict=True)):
        if count > available[i] and not (source.repeat and available[i]):
            weight = f"rows {source.rows}" if source.rows is not None else f"fraction {source.fraction:g}"
            fix = (
                "lower it, or set repeat: true to take its rows more than once"
                if available[i]
                else "give it data"
            )
            raise DataError(
                "too few rows",
                f"data.sources[{i}] ({source.path}): {weight} asks for {count} rows, but it has "
                f"{available[i]} training rows (after drops and held-out rows); {fix}",
            )
    if not sum(counts):
        raise DataError("too few rows", "data.sources: the mixture has no rows; give its sources data")
    return counts


def _apportioned(rows: int, fractions: dict[int, Fraction]) -> dict[int, int]:
    """``rows`` split in proportion to ``fractions``: each its whole quota, then one more to the largest
    remainders (ties: the earlier source), so the counts sum to ``rows`` exactly."""
    total = sum(fractions.values())
    quotas = {i: rows * fraction / total for i, fraction in fractions.items()}
    counts = {i: math.floor(quota) for i, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: rows - sum(counts.values())]:
        counts[i] += 1
    return counts


def rows_taken(available: int, count: int, generator: random.Random) -> tuple[list[int], int]:
    """``count`` row indices of ``available``, and the whole passes over them: a sample without
    replacement, in ascending order; asked for more rows than there are (``repeat``), every row as many
    times as fits first (the passes), then a sample of the rest."""
    passes, rest = divmod(count, available) if count > available else (0, count)
    return [*range(available)] * passes + sorted(generator.sample(range(available), rest)), passes


def _weight(source: SourceConfig) -> str:
    if source.fraction is not None:
        return f"fraction {source.fraction:g}" + (", repeat" if source.repeat else "")
    return f"rows {source.rows}" + (", repeat" if source.repeat else "") if source.rows is not None else "all"


# ── python -m data.prepare ─────────────────────────────────────────────────────────────
def main(argv: list[str]) -> int:
    """Compose the project's configs with ``argv`` as overrides, prepare, print the summary."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from data.config import compose_config, data_max_length
    from data.tokenizer import tokenizer_for

    cfg = compose_config(argv)
    model = cfg.model  # keys only train's schema defaults may be absent: .get
    try:
        data = OmegaConf.to_object(cfg.data)
        tokenizer = tokenizer_for(model)
        _, _, summary = prepare_from_config(
            data, tokenizer, max_length=data_max_length(cfg), objective=cfg.stage.name,
            seed=cfg.training.seed,
        )  # fmt: skip
    except (DataError, MissingMandatoryValue) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
