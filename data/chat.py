"""The Llama 3.1 chat encoder: messages → token ids + per-token assistant masks.

Token-exact with the official Llama 3.1 Instruct chat template
(``llama31_instruct_chat_template.jinja``) for dialogs of system, user and assistant
turns. Content is always encoded as text: a ``<|eot_id|>`` written inside a message is
ordinary tokens, never a control token (as Meta's reference ``ChatFormat`` does).
Tool definitions, tool calls and ``ipython`` turns come with the data-module issue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")
# The template's default when no date_string is given.
DEFAULT_DATE_STRING = "26 Jul 2024"
KNOWLEDGE_CUTOFF = "Cutting Knowledge Date: December 2023\n"


def validate_messages(messages: Sequence[Mapping]) -> None:
    """Raise ValueError naming the offending message index when a dialog cannot be encoded."""
    if not messages:
        raise ValueError("empty conversation: at least one message is needed")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise ValueError(f"message {index}: a system message may only come first")
        if message.get("tool_calls"):
            raise ValueError(f"message {index}: tool calls are not supported by this encoder yet")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {index}: content must be a string, got {type(message.get('content')).__name__}"
            )


def encode_chat(
    messages: Sequence[Mapping], tokenizer, *, date_string: str | None = None
) -> dict[str, list[int]]:
    """Encode a dialog as the Llama 3.1 Instruct template does, with assistant masks.

    Returns ``input_ids`` and ``assistant_masks`` (same length). The mask is 1 on every
    assistant turn's content and its closing ``<|eot_id|>``, 0 elsewhere (BOS, headers,
    system, user). Content is trimmed of surrounding whitespace, as the template does.
    """
    validate_messages(messages)
    special = tokenizer.convert_tokens_to_ids

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True)

    start_header, end_header, eot = (
        special("<|start_header_id|>"),
        special("<|end_header_id|>"),
        special("<|eot_id|>"),
    )
    input_ids: list[int] = [tokenizer.bos_token_id]
    assistant_masks: list[int] = [0]

    def add(ids: list[int], learn: bool) -> None:
        input_ids.extend(ids)
        assistant_masks.extend([int(learn)] * len(ids))

    def header(role: str) -> list[int]:
        return [start_header, *text(role), end_header, *text("\n\n")]

    system_message = ""
    if messages[0]["role"] == "system":
        system_message, messages = messages[0]["content"].strip(), messages[1:]
    # The system block is one text span in the template, so it is encoded as one.
    system_body = f"{KNOWLEDGE_CUTOFF}Today Date: {date_string or DEFAULT_DATE_STRING}\n\n{system_message}"
    add([*header("system"), *text(system_body), eot], learn=False)

    for message in messages:
        learn = message["role"] == "assistant"
        add(header(message["role"]), learn=False)
        add([*text(message["content"].strip()), eot], learn=learn)
    return {"input_ids": input_ids, "assistant_masks": assistant_masks}
