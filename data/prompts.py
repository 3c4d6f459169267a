"""Prompts for online RL (stage=grpo): rows of ``prompt``, a chat up to where the model answers, and any
other fields of the record, which reach the reward functions under their own names (TRL's GRPOTrainer
passes every column but ``prompt`` to them: an ``answer`` column is what ``exact_answer`` checks).

Two kinds of source:

- ``format: prompts``: records with a ``prompt``, a string (one user message) or a list of messages that
  ends on a user (or tool result) turn, and whatever else they carry, kept as columns;
- any chat format (``messages``, ``sharegpt``, OpenAssistant trees, ...): each conversation up to its last
  assistant reply is the prompt, and that reply is kept as ``reference`` (a reward function may compare).

TRL renders each prompt with the tokenizer's chat template, which is the official Llama 3.1 (or 3.2)
template this project attaches (``data.tokenizer.tokenizer_for``), with the generation prompt: the
completion starts after ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``, as Meta's models answer.
Prompts are small, so they are read whole and not cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from datasets import Dataset

from data.chat import encode_chat, validate_messages
from data.held_out import GROUP, group_of
from data.readers import ReadResult, load_conversations, reporter
from data.sources import DataError, read_records
from data.summary import drop_lines

PROMPT_FORMAT = "prompts"
REFERENCE = "reference"  # the column of a chat source's own last reply


@dataclass
class PromptSummary:
    """What was read: prompts kept, records left out by reason with the first of each."""

    source: str
    prompts: int = 0
    columns: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    held_out: str = ""

    def __str__(self) -> str:
        extra = f"; columns for the rewards: {', '.join(self.columns)}" if self.columns else ""
        lines = [f"{self.source}", f"  {self.prompts} prompts{extra}"]
        lines += drop_lines(self)
        return "\n".join(lines + ([f"  {self.held_out}"] if self.held_out else []))


@dataclass
class PromptRecords(ReadResult):
    """What a ``prompts`` file held: its records, and those left out by reason."""

    records: int = 0

    def found(self) -> str:
        return f"{self.records} records"


def load_prompts(
    path,
    format: str,
    *,
    lang=None,
    threads: str = "best",
    strict: bool = False,
    messages_field: str | None = None,
    chat_format: str = "llama3.1",
    with_groups: bool = False,
    tokenizer=None,
    max_tokens: int | None = None,
) -> tuple[Dataset, PromptSummary]:
    """The prompts of ``path`` as a dataset (``prompt`` and the other columns; ``group`` with
    ``with_groups``, for ``data.held_out``) and its summary. A record without a usable prompt is a bad record:
    counted, or raised with ``strict``. ``max_tokens`` (with ``tokenizer``): a prompt that takes more, in the
    Llama 3.1 format up to the assistant header the completion follows, is left out and counted (cut, it
    would lose its beginning or its question; the run's bound is training.max_length less
    stage.max_completion_length, so that prompt and completion fit the length the run was planned for)."""
    if format == PROMPT_FORMAT:
        read = PromptRecords(source=str(path))
        report = reporter(read, strict)
        rows, places = [], []
        for where, record in read_records(path, report):
            read.records += 1
            try:
                rows.append(prompt_row(record))
                places.append(where)
            except DataError as error:
                report(where, error)
    else:
        read = load_conversations(
            path, format, lang=lang, threads=threads, strict=strict, messages_field=messages_field,
            chat_format=chat_format,
        )  # fmt: skip
        rows, places = [], []
        for number, conversation in enumerate(read.conversations, 1):
            if (row := _until_last_reply(conversation)) is not None:
                rows.append(row)
                places.append(f"{path}: conversation {number}")
        if len(rows) < len(read.conversations):
            read.dropped["no turn before the last assistant reply"] += len(read.conversations) - len(rows)
    if max_tokens is not None:
        rows = _within(rows, places, read, tokenizer, max_tokens)
    if not rows:
        raise DataError("no prompts", f"{path}: no usable prompt (format {format!r})\n{read.summary()}")
    columns = sorted({key for row in rows for key in row} - {"prompt"})
    missing = [key for key in columns if any(key not in row for row in rows)]
    if missing:
        raise DataError(
            "uneven columns",
            f"{path}: some records have {', '.join(missing)} and some do not; give every record the same "
            "fields",
        )
    if with_groups:
        rows = [{**row, GROUP: group_of(row["prompt"])} for row in rows]
    summary = PromptSummary(
        source=str(path), prompts=len(rows), columns=columns, dropped=dict(read.dropped.most_common()),
        examples=read.examples,
    )  # fmt: skip
    return Dataset.from_list(rows), summary


def prompt_row(record) -> dict:
    """A ``prompts`` record as a row: its ``prompt`` as messages, its other fields as they are."""
    if not isinstance(record, Mapping) or "prompt" not in record:
        raise DataError("no prompt", "a record needs a 'prompt' (a string, or a list of messages)")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError("bad prompt", f"'prompt' must be a string or a list of messages, not {prompt!r:.80}")
    try:
        validate_messages(prompt)
    except ValueError as error:
        raise DataError("bad prompt", f"prompt {error}") from None
    if prompt[-1]["role"] not in ("user", "ipython", "tool"):
        raise DataError(
            "bad prompt",
            f"the prompt ends on a {prompt[-1]['role']} turn; it must end where the assistant answers "
            "(a user turn, or a tool result)",
        )
    others = {key: value for key, value in record.items() if key != "prompt"}
    return {"prompt": [dict(message) for message in prompt], **others}


def _within(rows: list[dict], places: list[str], read: ReadResult, tokenizer, max_tokens: int) -> list[dict]:
    """The rows whose prompt takes at most ``max_tokens`` as the model reads it (``prompt_ids``) and types
    no special token's text (``<|eot_id|>``: our encoder keeps it text, TRL's template would make it the
    token); the others counted on ``read`` with where they are."""
    special = [token.content for token in tokenizer.added_tokens_decoder.values()]
    kept = []
    for row, where in zip(rows, places, strict=True):
        typed = next((t for m in row["prompt"] for t in special if t in (m.get("content") or "")), None)
        if typed is not None:  # TRL renders text through the template, where it would become the token
            read.drop(where, "special-token text in a prompt",
                      f"{typed!r} typed in a message: TRL would read it as the token; remove it")  # fmt: skip
            continue
        length = len(prompt_ids(row["prompt"], tokenizer))
        if length <= max_tokens:
            kept.append(row)
        else:
            read.drop(where, f"prompt over {max_tokens} tokens", f"a prompt of {length} tokens")
    return kept


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The dialog in the Llama 3.1 format, ending in the assistant header the reply follows: the official
    template's ``add_generation_prompt=True``, token for token (what TRL renders for GRPO, and what
    ``train.chat`` sends). Built with ``encode_chat`` (an empty assistant turn, less its closing
    ``<|eot_id|>``), so typed text stays text: a user cannot end a turn by typing ``<|eot_id|>``, as the
    template would let them."""
    return encode_chat([*messages, {"role": "assistant", "content": ""}], tokenizer)["input_ids"][:-1]


def _until_last_reply(messages: list[dict]) -> dict | None:
    """A conversation up to its last assistant reply, and that reply as ``reference``."""
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if not last:
        return None
    return {"prompt": messages[:last], REFERENCE: messages[last].get("content") or ""}
