"""The Llama 3 chat encoder: messages → token ids + per-token assistant masks.

Token-exact with the official Llama 3.1 Instruct chat template
(``llama31_instruct_chat_template.jinja``, rendered as transformers renders it) for every
dialog it can render: system prompts and the default system header, multi-turn, trimming,
custom JSON tools, built-in tools (``<|python_tag|>`` calls ending in ``<|eom_id|>``) and
``ipython`` tool output. Llama 3.2's template (``llama32_instruct_chat_template.jinja``) is
the same without built-in tools; the tokenizer's template says which one a dialog is
encoded for (``chat_format_of``). One deliberate difference: message content is always text, so a
``<|eot_id|>`` written inside user data stays ordinary tokens and can never forge a turn
(Meta's reference ``ChatFormat`` does the same).

The template is followed in its quirks too, each marked below with "template:".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    options = {
        "tools": tools, "builtin_tools": builtin_tools, "date_string": date_string,
        "tools_in_user_message": tools_in_user_message,
    }  # fmt: skip
    return encode_chats([messages], tokenizer, **options)[0]


def encode_chats(dialogs: Sequence[Sequence[Mapping]], tokenizer, **options) -> list[dict[str, list[int]]]:
    """``encode_chat`` for many dialogs at once: all their text goes through one batched Rust call."""
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL}
    builtin_tools_allowed = chat_format_of(tokenizer) == "llama3.1"
    plans = [_plan(messages, builtin_tools_allowed=builtin_tools_allowed, **options) for messages in dialogs]
    encoded = iter(
        _encode_text(tokenizer, [piece for plan in plans for piece, _ in plan if isinstance(piece, str)])
    )
    results = []
    for plan in plans:
        input_ids, assistant_masks = [], []
        for piece, learn in plan:
            ids = next(encoded) if isinstance(piece, str) else [special[piece.token]]
            input_ids += ids
            assistant_masks += [learn] * len(ids)
        results.append({"input_ids": input_ids, "assistant_masks": assistant_masks})
    return results


def check_chat(messages: Sequence[Mapping], *, chat_format: str = "llama3.1", **options) -> None:
    """Raise ValueError where ``encode_chat(messages, **options)`` would, for a tokenizer of ``chat_format``,
    without a tokenizer: a reader names the record before any encoding starts."""
    _plan(messages, builtin_tools_allowed=chat_format == "llama3.1", **options)


def chat_format_of(tokenizer) -> str:
    """The chat format (``data.tokenizer.CHAT_TEMPLATES``) whose official template ``tokenizer`` carries, as
    ``data.load_tokenizer`` attaches it. Another template is refused: this encoder writes only those."""
    from data.tokenizer import CHAT_TEMPLATES

    template = tokenizer.chat_template
    if template not in _FORMAT_OF_TEMPLATE:
        _FORMAT_OF_TEMPLATE.update({path.read_text(): name for name, path in CHAT_TEMPLATES.items()})
    if template not in _FORMAT_OF_TEMPLATE:
        raise ValueError(
            "the tokenizer's chat template is not an official Llama 3 Instruct one that this encoder writes "
            f"({', '.join(CHAT_TEMPLATES)}): load it with data.load_tokenizer(path, chat_format=...)"
        )
    return _FORMAT_OF_TEMPLATE[template]


_FORMAT_OF_TEMPLATE: dict[str, str] = {}


# ── the template as a plan: text pieces and special tokens, each learned or not ─────────
@dataclass(frozen=True)
class _Special:
    token: str


_SPECIAL = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)
_BOS, _START, _END, _EOT, _EOM, _PYTHON_TAG = (_Special(t) for t in _SPECIAL)


def _plan(
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    builtin_tools: Sequence[str] | None = None,
    date_string: str | None = None,
    tools_in_user_message: bool = True,
    builtin_tools_allowed: bool = True,
) -> list[tuple[str | _Special, int]]:
    validate_messages(messages)
    if builtin_tools is not None and not builtin_tools_allowed:
        raise ValueError(
            f"built-in tools {list(builtin_tools)}: Llama 3.2's chat template has none (no <|python_tag|> "
            "calls, no <|eom_id|>); define them as custom tools (JSON schemas), or train Llama 3.1/3.3"
        )
    plan: list[tuple[str | _Special, int]] = [(_BOS, 0)]

    def turn(role: str, body: str, end: _Special, learn: bool = False, python_tag: bool = False) -> None:
        # "\n\n" after the header is its own pre-token whenever the body starts with a
        # non-space (trimmed text, JSON, <|python_tag|>), so encoding it apart is exact.
        plan.extend([(_START, 0), (role, 0), (_END, 0), ("\n\n", 0)])
        if python_tag:
            plan.append((_PYTHON_TAG, int(learn)))
        plan.extend([(body, int(learn)), (end, int(learn))])

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
    turn("system", system + system_message, _EOT)

    if tools is not None and tools_in_user_message:
        if not messages or messages[0]["role"] != "user":
            raise ValueError(
                "custom tools go in the first user message, but the dialog does not start with one"
            )
        definitions = "".join(_tojson(t, indent=4) + "\n\n" for t in tools)
        first_user, messages = messages[0]["content"].strip(), messages[1:]
        turn("user", TOOLS_IN_USER + FUNCTION_FORMAT + definitions + first_user, _EOT)

    tool_call_end = _EOM if builtin_tools is not None else _EOT
    for message in messages:
        role = message["role"]
        if message.get("tool_calls") is not None:
            call = message["tool_calls"][0]["function"]
            name, arguments = call["name"], call.get("arguments", {})
            if builtin_tools is not None and name in builtin_tools:
                args = ", ".join(f'{key}="{value}"' for key, value in arguments.items())
                turn("assistant", f"{name}.call({args})", tool_call_end, learn=True, python_tag=True)
            else:
                turn(
                    "assistant",
                    '{"name": "' + name + '", "parameters": ' + _tojson(arguments) + "}",
                    tool_call_end,
                    learn=True,
                )
        elif role in ("ipython", "tool"):
            # template: a string is "iterable" in Jinja, so string output is JSON-quoted too
            turn("ipython", _tojson(message["content"]), _EOT)
        else:
            turn(role, message["content"].strip(), _EOT, learn=role == "assistant")
    return plan


def _encode_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, read as plain text: a "<|eot_id|>" in data is never a control token.

    One call into the Rust backend for the whole list (it parallelises across cores); the
    backend's switch is restored afterwards.
    """
    # Headers, "\n\n" and the default system prompt recur in every dialog: encode each text once.
    unique = list(dict.fromkeys(texts))
    backend = tokenizer.backend_tokenizer
    special_as_text, processor = backend.encode_special_tokens, backend.post_processor
    # The post-processor only adds BOS and fixes offsets, neither wanted here; it costs ~40%.
    backend.encode_special_tokens, backend.post_processor = True, None
    try:
        encodings = backend.encode_batch_fast(unique, add_special_tokens=False)
    finally:
        backend.encode_special_tokens, backend.post_processor = special_as_text, processor
    ids = {text: encoding.ids for text, encoding in zip(unique, encodings, strict=True)}
    return [ids[text] for text in texts]
