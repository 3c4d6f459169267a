"""The chat-template data module: OpenAssistant-style data → exact Llama 3.1 tokens + assistant masks.

Usable on its own (imports neither ``train`` nor ``launch``)::

    from data import load_tokenizer, encode_chat
    tokenizer = load_tokenizer()
    encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
"""

from data.chat import encode_chat, validate_messages
from data.preference import Preferences, load_preferences, unpaired
from data.prepare import PrepareSummary, encode_conversations, prepare_dataset, prepare_from_config
from data.prepare_preference import (
    PreferenceSummary,
    encode_preference,
    encode_preference_records,
    encode_preferences,
    prepare_preferences,
)
from data.readers import Conversations, DataError, load_conversations
from data.tokenizer import load_tokenizer

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
