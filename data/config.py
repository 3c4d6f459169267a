"""The data settings (``data:`` in ``conf/``) and the config that ``python -m data.prepare`` composes itself.

``train.config`` builds its schema on ``DataConfig``; nothing here imports ``train``, so the data module and
its command work without it (imports go one way: ``train`` uses ``data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
# Chat formats the encoder writes (``model.chat_format``), each an official Instruct template
# (``data.tokenizer.CHAT_TEMPLATES``): Llama 3.1 and 3.3 share one, Llama 3.2 1B/3B have their own.
CHAT_FORMATS = ("llama3.1", "llama3.2")
# Formats whose records hold a list of messages, and the key it is under unless data.messages_field says
MESSAGES_FIELDS = {"messages": "messages", "sharegpt": "conversations"}


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING
    format: str = MISSING
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


def sample_path(name: str) -> str:
    """``${sample:file}`` in configs: a data file shipped in ``data/samples/``."""
    return str(SAMPLES_DIR / name)


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
