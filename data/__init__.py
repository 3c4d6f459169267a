"""The chat-template data module: OpenAssistant-style data → exact Llama 3.1 tokens + assistant masks.

Usable on its own (imports neither ``train`` nor ``launch``)::

    from data import load_tokenizer, encode_chat
    tokenizer = load_tokenizer()
    encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
"""

from data.chat import encode_chat, validate_messages
from data.prepare import PrepareSummary, encode_conversations, prepare_dataset, prepare_from_config
from data.readers import Conversations, DataError, load_conversations
from data.tokenizer import load_tokenizer

__all__ = [
    "Conversations",
    "DataError",
    "encode_chat",
    "encode_conversations",
    "load_conversations",
    "load_tokenizer",
    "prepare_dataset",
    "prepare_from_config",
    "PrepareSummary",
    "validate_messages",
]
