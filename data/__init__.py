"""The chat-template data module: OpenAssistant-style data → exact Llama 3 tokens + assistant masks.

Usable on its own (imports neither ``train`` nor ``launch``)::

    from data import load_tokenizer, encode_chat
    tokenizer = load_tokenizer()
    encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)

One pipeline prepares every objective (``data.prepare``): a reader turns a source into records
(``data.readers``: chats; ``data.preference``: pairs or labelled completions), ``data.rows`` encodes them,
and the pipeline caches rows and summary (``data.cache``, ``data.summary``). Online RL reads prompts
(``data.prompts``), which TRL renders itself.
"""

import importlib

# Each name is imported on first use (PEP 562), not with the package: ``train.config`` imports the data
# settings (``data.config``) and must not load transformers with them, and ``python -m data.prepare``
# runs prepare.py as __main__ after importing this package (runpy warns when the package imported it).
_PUBLIC = {
    "Conversations": "data.readers",
    "DataError": "data.sources",
    "load_conversations": "data.readers",
    "encode_chat": "data.chat",
    "validate_messages": "data.chat",
    "load_tokenizer": "data.tokenizer",
    "tokenizer_for": "data.tokenizer",
    "Preferences": "data.preference",
    "load_preferences": "data.preference",
    "unpaired": "data.preference",
    "load_prompts": "data.prompts",
    "encode_conversations": "data.rows",
    "encode_preference": "data.rows",
    "encode_preference_records": "data.rows",
    "encode_preferences": "data.rows",
    "PrepareSummary": "data.summary",
    "PreferenceSummary": "data.summary",
    "prepare_dataset": "data.prepare",
    "prepare_from_config": "data.prepare",
    "prepare_preferences": "data.prepare",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_PUBLIC)
