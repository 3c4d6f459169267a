"""The chat-template data module: OpenAssistant-style data → exact Llama 3.1 tokens + assistant masks.

Usable on its own (imports neither ``train`` nor ``launch``)::

    from data import load_tokenizer, encode_chat
    tokenizer = load_tokenizer()
    encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
"""

import importlib

from data.chat import encode_chat, validate_messages
from data.preference import Preferences, load_preferences, unpaired
from data.readers import Conversations, DataError, load_conversations
from data.tokenizer import load_tokenizer

# Imported on first use (PEP 562), not with the package: `python -m data.prepare` runs prepare.py as __main__
# after importing this package, and runpy warns when the package has already imported it as data.prepare
# (prepare_preference.py imports it too).
_LAZY = {
    "PrepareSummary": "data.prepare",
    "encode_conversations": "data.prepare",
    "prepare_dataset": "data.prepare",
    "prepare_from_config": "data.prepare",
    "PreferenceSummary": "data.prepare_preference",
    "encode_preference": "data.prepare_preference",
    "encode_preference_records": "data.prepare_preference",
    "encode_preferences": "data.prepare_preference",
    "prepare_preferences": "data.prepare_preference",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Conversations",
    "DataError",
    "encode_chat",
    "encode_conversations",
    "encode_preference",
    "encode_preference_records",
    "encode_preferences",
    "load_conversations",
    "load_preferences",
    "load_tokenizer",
    "Preferences",
    "PreferenceSummary",
    "prepare_dataset",
    "prepare_from_config",
    "prepare_preferences",
    "PrepareSummary",
    "unpaired",
    "validate_messages",
]
