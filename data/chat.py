"""The Llama 3.1 chat encoder: messages → token ids + per-token assistant masks.

Token-exact with the official Llama 3.1 Instruct chat template
(``llama31_instruct_chat_template.jinja``, rendered as transformers renders it) for every
dialog it can render: system prompts and the default system header, multi-turn, trimming,
custom JSON tools, built-in tools (``<|python_tag|>`` calls ending in ``<|eom_id|>``) and
``ipython`` tool output. One deliberate difference: message content is always text, so a
``<|eot_id|>`` written inside user data stays ordinary tokens and can never forge a turn
(Meta's reference ``ChatFormat`` does the same).

The template is followed in its quirks too, each marked below with "template:".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant", "ipython", "tool")
# template: the date used when no date_string is given.
DEFAULT_DATE_STRING = "26 Jul 2024"
KNOWLEDGE_CUTOFF = "Cutting Knowledge Date: December 2023\n"
FUNCTION_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
TOOLS_IN_SYSTEM = (
    "You have access to the following functions. "
    "To call a function, please respond with JSON for a function call."
)
TOOLS_IN_USER = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
)


def _tojson(value, indent: int | None = None) -> str:
    # template: transformers' tojson filter (no HTML escaping, non-ASCII kept)
    return json.dumps(value, ensure_ascii=False, indent=indent)


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
        content = message.get("content")
        if message.get("tool_calls") is not None:
            _validate_tool_calls(index, role, message["tool_calls"])
        elif role in ("ipython", "tool"):
            if not isinstance(content, (str, dict, list)):
                raise ValueError(f"message {index}: tool output must be a string or JSON object/list")
        elif not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")


def _validate_tool_calls(index: int, role: str, tool_calls) -> None:
    if role != "assistant":
        raise ValueError(f"message {index}: only assistant messages make tool calls, not {role!r}")
    if not isinstance(tool_calls, list) or len(tool_calls) != 1:
        raise ValueError(f"message {index}: Llama 3.1 makes exactly one tool call per message")
    function = tool_calls[0].get("function") if isinstance(tool_calls[0], Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            f'message {index}: a tool call is {{"type": "function", "function": {{"name", "arguments"}}}}'
        )


def encode_chat(
    messages: Sequence[Mapping],
    tokenizer,
    *,
    tools: Sequence[Mapping] | None = None,
    builtin_tools: Sequence[str] | None = None,
    date_string: str | None = None,
    tools_in_user_message: bool = True,
) -> dict[str, list[int]]:
    """Encode a dialog as the Llama 3.1 Instruct template does, with assistant masks.

    ``tools``: custom tool definitions (JSON schemas), placed in the first user message
    (or the system prompt with ``tools_in_user_message=False``). ``builtin_tools``: names
    such as ``brave_search``, ``wolfram_alpha``, ``code_interpreter``; calls to them render
    as ``<|python_tag|>name.call(...)`` and every tool call then ends in ``<|eom_id|>``.

    Returns ``input_ids`` and ``assistant_masks`` (same length): 1 on every assistant turn's
    content (tool calls included) and its closing ``<|eot_id|>``/``<|eom_id|>``, 0 on BOS,
    headers, system, user and ipython output. As in the template, content is trimmed, and an
    assistant message with ``tool_calls`` renders only its call, not its content.
    """
    validate_messages(messages)
    encoder = _Encoder(tokenizer)
    messages = list(messages)

    system_message = ""
    if messages[0]["role"] == "system":
        system_message, messages = messages[0]["content"].strip(), messages[1:]
    system = ""
    if builtin_tools is not None or tools is not None:
        system += "Environment: ipython\n"
    if builtin_tools is not None:
        # template: code_interpreter is enabled by "Environment: ipython" alone
        system += "Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n"
    system += f"{KNOWLEDGE_CUTOFF}Today Date: {date_string or DEFAULT_DATE_STRING}\n\n"
    if tools is not None and not tools_in_user_message:
        system += TOOLS_IN_SYSTEM + FUNCTION_FORMAT + "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
    encoder.turn("system", system + system_message, end="<|eot_id|>")

    if tools is not None and tools_in_user_message:
        if not messages or messages[0]["role"] != "user":
            raise ValueError(
                "custom tools go in the first user message, but the dialog does not start with one"
            )
        definitions = "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
        first_user, messages = messages[0]["content"].strip(), messages[1:]
        encoder.turn("user", TOOLS_IN_USER + FUNCTION_FORMAT + definitions + first_user, end="<|eot_id|>")

    tool_call_end = "<|eom_id|>" if builtin_tools is not None else "<|eot_id|>"
    for message in messages:
        role = message["role"]
        if message.get("tool_calls") is not None:
            call = message["tool_calls"][0]["function"]
            name, arguments = call["name"], call.get("arguments", {})
            if builtin_tools is not None and name in builtin_tools:
                args = ", ".join(f'{key}="{value}"' for key, value in arguments.items())
                encoder.turn(
                    "assistant", f"{name}.call({args})", end=tool_call_end, learn=True, python_tag=True
                )
            else:
                text = '{"name": "' + name + '", "parameters": ' + _tojson(arguments) + "}"
                encoder.turn("assistant", text, end=tool_call_end, learn=True)
        elif role in ("ipython", "tool"):
            # template: a string is "iterable" in Jinja, so string output is JSON-quoted too
            encoder.turn("ipython", _tojson(message["content"]), end="<|eot_id|>")
        else:
            encoder.turn(role, message["content"].strip(), end="<|eot_id|>", learn=role == "assistant")
    return {"input_ids": encoder.input_ids, "assistant_masks": encoder.assistant_masks}


class _Encoder:
    """Appends turns as the template's token spans: special tokens from the format, text as text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {
            token: tokenizer.convert_tokens_to_ids(token)
            for token in (
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            )
        }
        self.input_ids: list[int] = [tokenizer.bos_token_id]
        self.assistant_masks: list[int] = [0]

    def text(self, text: str) -> list[int]:
        return (
            self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
        )

    def add(self, ids: list[int], learn: bool) -> None:
        self.input_ids.extend(ids)
        self.assistant_masks.extend([int(learn)] * len(ids))

    def turn(self, role: str, body: str, *, end: str, learn: bool = False, python_tag: bool = False) -> None:
        # "\n\n" after the header is its own pre-token whenever the body starts with a
        # non-space (trimmed text, JSON, <|python_tag|>), so encoding it apart is exact.
        header = [self.special["<|start_header_id|>"], *self.text(role), self.special["<|end_header_id|>"]]
        self.add(header + self.text("\n\n"), learn=False)
        tag = [self.special["<|python_tag|>"]] if python_tag else []
        self.add(tag + self.text(body) + [self.special[end]], learn=learn)
