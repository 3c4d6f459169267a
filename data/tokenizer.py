"""The Llama 3 Instruct tokenizer as a transformers fast tokenizer.

With no path it is built from Meta's ``tokenizer.model`` that ships inside the
``llama-models`` package (no hub, no network), with the 256 special tokens at
their Llama 3.1 ids and the official Instruct chat template of the chosen chat
format attached; the converted tokenizer is cached on disk. With a path it loads
a local tokenizer directory, such as a real checkpoint's.

Llama 3.1, 3.2 (1B, 3B) and 3.3 share this tokenizer (the same 128,000 BPE tokens
and 256 special tokens); what differs is the chat template (``CHAT_TEMPLATES``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from data.cache import atomic_directory
from data.cache import cache_dir as default_cache
from data.config import CHAT_FORMATS

CHAT_TEMPLATE_FILE = Path(__file__).with_name("llama31_instruct_chat_template.jinja")
# The official Instruct chat template of each chat format (``model.chat_format``). Sources: the
# tokenizer_config.json of meta-llama/Llama-3.1-8B-Instruct (3.3 70B ships the same template) and of
# meta-llama/Llama-3.2-1B-Instruct (3B's is the same): 3.2 has no built-in tools, and takes today's
# date where transformers gives it ``strftime_now`` (the encoder pins the template's fallback date).
CHAT_TEMPLATES = {
    "llama3.1": CHAT_TEMPLATE_FILE,
    "llama3.2": Path(__file__).with_name("llama32_instruct_chat_template.jinja"),
}
assert tuple(CHAT_TEMPLATES) == CHAT_FORMATS

# Bumped whenever the conversion below changes, so stale caches are not reused.
_CONVERSION_VERSION = "1"

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
# Where generation stops: end of text, end of message (a tool call), end of turn. Source: Meta's Llama 3.1
# Instruct generation_config.json, eos_token_id [128001, 128008, 128009].
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", EOT)


def llama31_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1, in id order from 128000.

    Source: Meta's llama3.1 ``tokenizer_config.json`` / ``llama_models.llama3_1``. The
    newer ``llama_models.llama3.tokenizer`` names 128005 ``<|step_id|>`` and 128011
    ``<|image|>`` (Llama 3.2 names); Llama 3.1 calls them reserved tokens 2 and 3.
    """
    named = [
        "<|begin_of_text|>",  # 128000
        "<|end_of_text|>",  # 128001
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",  # 128004
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",  # 128006
        "<|end_header_id|>",  # 128007
        "<|eom_id|>",  # 128008
        "<|eot_id|>",  # 128009
        "<|python_tag|>",  # 128010
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]
    return named + reserved


def meta_tokenizer_model() -> Path:
    """Path of Meta's tiktoken ``tokenizer.model`` inside the installed llama-models package."""
    import llama_models.llama3.tokenizer as meta_tokenizer

    return Path(meta_tokenizer.__file__).with_name("tokenizer.model")


def meta_split_pattern() -> str:
    """The pre-tokenization regex of Meta's reference tokenizer."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.pat_str


def chat_template(chat_format: str) -> str:
    """The official Instruct chat template of ``chat_format`` (a key of ``CHAT_TEMPLATES``)."""
    if chat_format not in CHAT_TEMPLATES:
        raise ValueError(f"chat format {chat_format!r}: expected one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[chat_format].read_text()


def load_tokenizer(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    chat_format: str = "llama3.1",
):
    """Return the Llama 3 Instruct fast tokenizer with ``chat_format``'s official chat template.

    ``path``: a local tokenizer directory (``tokenizer.json`` + config, as in a real
    checkpoint). Without one the tokenizer is converted from llama-models' file and cached
    under ``cache_dir`` (default ``$XDG_CACHE_HOME/llama31-finetune/tokenizer``).
    Either way the template is ``chat_format``'s, whatever a checkpoint ships: the encoder
    (``data.chat``) writes that format, and a model saved with this tokenizer must say so.
    The returned tokenizer pads with ``<|finetune_right_pad_id|>``, never with EOS, so a
    collator cannot mask the ``<|eot_id|>`` the model must learn; its EOS is ``<|eot_id|>``,
    the end of an Instruct turn, even where a base checkpoint says ``<|end_of_text|>``.
    """
    template = chat_template(chat_format)
    if path is not None:
        return _load_local(Path(path), template)
    model_file = meta_tokenizer_model()
    key = hashlib.sha256(
        model_file.read_bytes() + template.encode() + _CONVERSION_VERSION.encode()
    ).hexdigest()[:16]
    cached = Path(cache_dir or default_cache("tokenizer")) / key
    if (cached / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(cached)
    with atomic_directory(cached) as scratch:
        _convert(model_file, template).save_pretrained(scratch)
    # as every later load reads it: the prepared datasets' cache key hashes the tokenizer.json a tokenizer
    # was loaded from, so a tokenizer just converted must be that one too, or its first run keys another entry
    return PreTrainedTokenizerFast.from_pretrained(cached)


def tokenizer_for(model) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``model:`` config (``conf/model/``): ``tokenizer_path``, else ``path``, else the
    llama-models one, with the model's ``chat_format`` (Llama 3.1 where a config does not say)."""
    path = getattr(model, "tokenizer_path", None) or getattr(model, "path", None)
    return load_tokenizer(path, chat_format=getattr(model, "chat_format", None) or "llama3.1")


def _load_local(path: Path, template: str) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer path {path} is not a directory; point model.tokenizer_path (or model.path) "
            "at a local checkpoint directory holding tokenizer.json, or leave it empty for the "
            "Llama 3.1 tokenizer shipped with llama-models"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(
            f"{path}: expected a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}"
        )
    # Base checkpoints ship no template; Instruct ones ship the official one. We train the Instruct format.
    tokenizer.chat_template = template
    if tokenizer.pad_token is None and PAD in tokenizer.get_vocab():
        tokenizer.pad_token = PAD
    if EOT in tokenizer.get_vocab():
        # A base checkpoint's EOS is <|end_of_text|>; we train the Instruct format, whose turns end in
        # <|eot_id|>, and a model saved with this tokenizer must stop there (as Meta's Instruct one does).
        tokenizer.eos_token = EOT
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at (``STOP_TOKENS``): [128001, 128008, 128009] in Llama 3.1."""
    return tokenizer.convert_tokens_to_ids(list(STOP_TOKENS))


def _convert(model_file: Path, template: str) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(model_file), pattern=meta_split_pattern()).converted()
    base_vocab = backend.get_vocab_size()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in llama31_special_tokens()]
    )
    bos_id = base_vocab  # 128000: the first special token
    # As in Meta's checkpoints' tokenizer.json: BOS is prepended when add_special_tokens=True.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=template,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,  # Meta decodes bytes as they are
        model_input_names=["input_ids", "attention_mask"],
    )
