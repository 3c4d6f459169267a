"""A seeded generator of Llama 3.1 dialogs covering everything the Instruct template can render."""

from __future__ import annotations

import random

FRAGMENTS = [
    "Hello",
    "world",
    "How are you?",
    "Grüß Gott",
    "Ça va",
    "¿Qué tal?",
    "नमस्ते",
    "สวัสดีครับ",
    "Olá",
    "Ciao",
    "def f(x):\n    return x ** 2",
    "SELECT * FROM t;",
    '{"a": [1, 2.5, null]}',
    "3.14159",
    "1,000,000",
    "I'm",
    "they'll",
    "don't",
    "🦙",
    "羊驼",
    "a\tb",
    "line\nbreak",
    "\n\n",
    "  ",
    "---",
    "**bold**",
    "`code`",
    "<b>html</b>",
    "path/to/file.txt",
    "e = mc^2",
    "50%",
    "$5",
    "ok.",
    "!",
    "...",
    "\\n",
    "'quoted'",
    '"dq"',
]
WHITESPACE = ["", " ", "  ", "\n", "\n\n", "\t", " \n "]
CUSTOM_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. München"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert an amount between currencies",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "to": {"type": "string", "enum": ["EUR", "USD"]},
                },
                "required": ["amount", "to"],
            },
        },
    },
]
BUILTIN_TOOLS = ["brave_search", "wolfram_alpha", "code_interpreter"]


def text(rng: random.Random, words: int | None = None) -> str:
    body = rng.choice([" ", "", "\n"]).join(rng.choice(FRAGMENTS) for _ in range(words or rng.randint(1, 12)))
    return rng.choice(WHITESPACE) + body + rng.choice(WHITESPACE)


def tool_output(rng: random.Random):
    return rng.choice(
        [
            text(rng),
            {"temperature": rng.randint(-10, 35), "unit": "°C", "city": rng.choice(["Paris", "São Paulo"])},
            [{"title": text(rng, 2), "url": "https://example.org"}],
        ]
    )


def dialog(rng: random.Random) -> tuple[list[dict], dict]:
    """A dialog and the template variables it needs (tools, builtin_tools, date_string, ...)."""
    options: dict = {}
    if rng.random() < 0.3:
        options["tools"] = rng.sample(CUSTOM_TOOLS, rng.randint(1, 2))
        options["tools_in_user_message"] = rng.random() < 0.7
    if rng.random() < 0.3:
        options["builtin_tools"] = rng.sample(BUILTIN_TOOLS, rng.randint(1, 3))
    if rng.random() < 0.3:
        options["date_string"] = rng.choice(["01 Jan 2025", "23 Jul 2024", "30 Nov 2026"])
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": text(rng)})
    callable_tools = [t["function"]["name"] for t in options.get("tools", [])] + options.get(
        "builtin_tools", []
    )
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text(rng)})
        if callable_tools and rng.random() < 0.5:
            name = rng.choice(callable_tools)
            arguments = (
                {"code": "print(2 + 2)"} if name == "code_interpreter" else {"query": text(rng, 3).strip()}
            )
            if name == "convert":
                arguments = {"amount": rng.randint(1, 100), "to": "EUR"}
            messages.append(
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
                }
            )
            messages.append({"role": rng.choice(["ipython", "tool"]), "content": tool_output(rng)})
        messages.append({"role": "assistant", "content": text(rng)})
    return messages, options
