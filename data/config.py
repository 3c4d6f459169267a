"""The data settings (``data:`` in ``conf/``) and the config that ``python -m data.prepare`` composes itself.

``train.config`` builds its schema on ``DataConfig``; nothing here imports ``train``, so the data module and
its command work without it (imports go one way: ``train`` uses ``data``).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
# Chat formats the encoder writes (``model.chat_format``), each an official Instruct template
# (``data.tokenizer.CHAT_TEMPLATES``): Llama 3.1 and 3.3 share one, Llama 3.2 1B/3B have their own.
CHAT_FORMATS = ("llama3.1", "llama3.2")
# Formats whose records hold a list of messages, and the key it is under unless data.messages_field says
MESSAGES_FIELDS = {"messages": "messages", "sharegpt": "conversations"}
GLOB_CHARS = "*?["  # a source path with one of these is a glob of shards
HF_PREFIX = "hf:"  # a source path `hf:<name>[:<split>]`: a dataset in the local Hugging Face datasets cache


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``): where it is, its format and settings, and its weight.

    ``path``: a file; a directory or glob of shards of one format (``*.jsonl``, ``*.json``, ``*.parquet``,
    gzipped too; read in sorted order); a ``datasets`` ``save_to_disk`` directory; or ``hf:<name>[:<split>]``,
    a dataset already in the local Hugging Face datasets cache (split ``train`` by default), read offline.
    A setting left null takes the ``data.*`` value of the same name.

    Weight, at most one of: ``fraction`` (0 < f <= 1) of the mixture's training rows, or ``rows`` (a
    count); neither takes every training row of the source once. Exact rule (``data.prepare``):

    - fixed sources (``rows``, or no weight) give R rows; fraction sources share the rest;
    - only fractions: they sum to 1 and the mixture is the largest that needs no row of a source without
      ``repeat`` twice, ``min(available / fraction)`` over those sources (over all, if every one repeats);
    - fractions beside fixed sources: they sum to F < 1 and the mixture is ``round(R / (1 - F))`` rows;
    - fraction sources' rows are the mixture's size less R, split by fraction, largest remainder first;
      a source asked for more rows than it has is an error unless ``repeat: true``, which takes it whole
      as many times as fits (epochs) and then a seeded sample of the rest.
    """

    path: str = MISSING
    format: str = MISSING
    fraction: float | None = None
    rows: int | None = None
    # true: asked for more rows than it has, it is taken again (epochs of a small source)
    repeat: bool = False
    lang: list[str] | None = None
    threads: str | None = None
    strict: bool | None = None
    messages_field: str | None = None
    eval_split: float | None = None  # held out from this source before mixing; null: data.eval_split


@dataclass
class DataConfig:
    name: str = MISSING
    # One source: a file, a directory or glob of shards, a save_to_disk directory or hf:<name>[:<split>]
    # (SourceConfig says each); or none, and a mixture of several in `sources` instead.
    path: str | None = None
    format: str | None = None
    strict: bool = False  # true: the first bad record stops the run; false: skip and count it
    lang: list[str] | None = None  # OpenAssistant trees: keep only these language codes
    threads: str = "best"  # OpenAssistant trees: best (best-ranked reply at each step) or all (every path)
    # formats messages and sharegpt: the record's key holding the message list, when it is not the format's
    # own (null: `messages`, ShareGPT's `conversations`); e.g. `conversation`
    messages_field: str | None = None
    overflow: str = "truncate"  # conversations over training.max_length: truncate or drop
    num_proc: int = MISSING  # processes encoding the source (datasets' map)
    cache_dir: str | None = None  # prepared datasets; None: $XDG_CACHE_HOME/llama31-finetune/datasets
    pairs_per_prompt: int | None = None  # dpo/kto on OpenAssistant trees: pairs per prompt (None: all)
    min_rank_gap: int = 1  # dpo/kto on OpenAssistant trees: replies this many ranks apart make a pair
    # held-out rows for evaluation: a fraction (0.05) or a count (20) of the source's conversation groups
    # (data.eval_split: every conversation or pair that opens with the same user message is one group, so
    # an OpenAssistant tree is held out whole), chosen with training.seed; or a file of its own (eval_path)
    eval_split: float = 0.0
    eval_path: str | None = None
    eval_format: str | None = None  # eval_path's format; None: data.format
    # A mixture (instead of path/format): each source prepared and cached on its own, then a seeded choice
    # of its rows by weight (SourceConfig); data.* settings are the sources' defaults
    sources: list[SourceConfig] = field(default_factory=list)


def sources_of(data: DataConfig) -> list[tuple[str, DataConfig]]:
    """Each source of ``data`` with the key that names it in messages and its settings: ``data`` itself for
    one source, else one ``DataConfig`` per entry of ``data.sources``, its null settings taken from data.*."""
    if not data.sources:
        return [("data", data)]
    return [
        (f"data.sources[{index}]", source_data(data, source)) for index, source in enumerate(data.sources)
    ]


def source_data(data: DataConfig, source: SourceConfig) -> DataConfig:
    """The settings one source of a mixture is prepared with: its own, data.*'s where it leaves one null."""

    def own(key: str):
        value = getattr(source, key)
        return getattr(data, key) if value is None else value

    settings = {key: own(key) for key in ("lang", "threads", "strict", "messages_field", "eval_split")}
    return replace(data, path=source.path, format=source.format, eval_path=None, sources=[], **settings)


def source_problems(data: DataConfig) -> list[str]:
    """What is wrong with where the data comes from, before anything is read: a source and a mixture both
    or neither, weights that cannot make a mixture (``SourceConfig``). Each as 'key: what; the fix'."""
    if data.path is not None and data.sources:
        return ["data.path and data.sources are both set: train on one source (data.path) or a mixture"]
    if not data.sources:
        if data.path is None:
            return ["data.path: no data; set data.path (one source) or data.sources (a mixture)"]
        return [] if data.format is not None else ["data.format: required with data.path; name its format"]
    problems = []
    for index, source in enumerate(data.sources):
        key = f"data.sources[{index}]"
        if source.fraction is not None and source.rows is not None:
            problems.append(f"{key}: both fraction and rows; give one weight")
        if source.fraction is not None and not 0 < source.fraction <= 1:
            problems.append(f"{key}.fraction: {source.fraction}; a share of the mixture, 0 < fraction <= 1")
        if source.rows is not None and source.rows < 1:
            problems.append(f"{key}.rows: {source.rows}; a number of rows, at least 1")
        if source.repeat and source.fraction is None and source.rows is None:
            problems.append(
                f"{key}.repeat: a source without a weight is taken once, whole; give fraction or rows"
            )
    fractions = [share(source) for source in data.sources if source.fraction is not None]
    total = sum(fractions)
    if fractions and len(fractions) == len(data.sources) and abs(total - 1) > FRACTION_TOLERANCE:
        problems.append(
            f"data.sources: fractions sum to {float(total):g}; when every source has one they share the "
            "whole mixture and sum to 1"
        )
    if fractions and len(fractions) < len(data.sources) and total >= 1:
        problems.append(
            f"data.sources: fractions sum to {float(total):g}, leaving nothing for the sources with rows or "
            "no weight; make them sum to less than 1"
        )
    return problems


# fractions of a mixture of fractions only may sum to 1 this closely (1/3 written as 0.333333)
FRACTION_TOLERANCE = 1e-6


def share(source: SourceConfig) -> Fraction:
    """A source's fraction, exactly as written (0.3 is 3/10, not the float nearest it)."""
    return Fraction(str(source.fraction))


def source_exists(path: str) -> bool:
    """Whether a source path names something here: a file or directory, a glob that matches, or an
    ``hf:`` dataset (looked up in the Hugging Face cache when it is read). A cheap check for validation,
    without the readers' imports; ``data.sources.locate_source`` says what exactly is missing."""
    if path.startswith(HF_PREFIX):
        return True
    if any(char in path for char in GLOB_CHARS):
        return bool(glob.glob(path))
    return Path(path).exists()


def sample_path(name: str) -> str:
    """``${sample:file}`` in configs: a data file shipped in ``data/samples/``."""
    return str(SAMPLES_DIR / name)


def data_max_length(config) -> int:
    """The most tokens a prepared row may take, for a composed config (train's typed one or the raw one):
    training.max_length, or for GRPO a prompt's share of it (training.max_length less
    stage.max_completion_length: longer prompts are left out and counted, so that prompt and completion
    fit the length the run is planned for)."""
    if config.stage.name == "grpo":
        return config.training.max_length - config.stage.max_completion_length
    return config.training.max_length


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/`` composed with ``overrides`` as ``python -m train`` composes it, with ``data`` typed by
    ``DataConfig`` and the other groups as their files write them.

    The defaults list's ``schema`` is this one here, not train's: Hydra's struct mode still fails on an
    unknown key anywhere (``data.formatt=x``), but only the data node's types are checked, and keys that
    only train's schema gives a default (``model.tokenizer_path``) may be absent: read them with ``.get``.
    """
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node={"data": DataConfig})
    OmegaConf.register_new_resolver("sample", sample_path, replace=True)
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(config_name="config", overrides=overrides)
