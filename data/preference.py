"""Preference readers: local files → prompt/chosen/rejected pairs (DPO) or prompt/completion/label (KTO).

Formats (``format=``):

- ``preference``: ``prompt``/``chosen``/``rejected`` records, the shape TRL's DPOTrainer reads. Each is
  conversational (a list of ``{role, content}``; ``chosen``/``rejected`` one assistant message) or a plain
  string: a prompt string becomes one user turn, a completion string one assistant reply, because we
  always train in the Llama 3.1 chat format (TRL would concatenate the raw strings). Without ``prompt``,
  conversational ``chosen``/``rejected`` hold whole dialogs and the prompt is all but their last message
  (TRL's "implicit prompt").
- ``kto``: ``prompt``/``completion``/``label`` (``label`` true for a desirable completion), as KTOTrainer.
- ``oasst_messages`` / ``oasst_trees``: pairs mined from OpenAssistant trees (see ``tree_pairs``).

Records come out normalised: ``prompt`` a list of messages (an optional system message first, ending on
the user or tool turn the completions answer), ``chosen``/``rejected``/``completion`` a list of one
assistant message, ``label`` a bool. Files, bad records and ``strict`` behave as in ``data.readers``:
what is left out is counted by reason and the first of each named by file:line. One difference: the
first record decides the dataset's shape, so when it lacks a field the format needs, reading stops at
once with the field's name, whatever ``strict`` says (a wrong ``data.format`` is no bad record).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import oasst
from data.chat import validate_messages
from data.readers import TREE_FORMATS, ReadResult, checked_source, read_trees, reporter
from data.sources import DataError, Report, read_records

PREFERENCE_FORMATS = ("preference", "kto", *TREE_FORMATS)
PAIR_FIELDS = ("prompt", "chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
# The turn a completion answers: a user's question or a tool's output.
_PROMPT_ENDS = ("user", "ipython", "tool")
# Fields that tell what a record of the wrong format really is: (fields, its format, the fix).
_OTHER_SHAPES = (
    (("completion", "label"), "kto", "it looks like KTO data: set data.format=kto"),
    (("chosen", "rejected"), "preference", "it looks like preference pairs: set data.format=preference"),
    (("messages",), "messages", "it looks like chat data for supervised fine-tuning, not preference data"),
)


@dataclass
class Preferences(ReadResult):
    """What a preference reader produced: pairs (``paired``) or labelled completions (iterating it yields
    them), and what it left out (``summary()``)."""

    paired: bool = True
    records: list[dict] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def found(self) -> str:
        if self.paired:
            return f"{len(self.records)} pairs"
        desirable = sum(record["label"] for record in self.records)
        return f"{len(self.records)} completions ({desirable} desirable)"


def load_preferences(
    path: str | Path,
    format: str = "preference",
    *,
    lang: Sequence[str] | None = None,
    pairs_per_prompt: int | None = None,
    min_rank_gap: int = 1,
    strict: bool = False,
) -> Preferences:
    """Read ``path`` in ``format`` into preference records, counting what is left out and why.

    ``lang``, ``pairs_per_prompt`` and ``min_rank_gap`` apply to the OpenAssistant tree formats only;
    see ``tree_pairs`` for the last two. A tree's language is its root prompt's ``lang``.
    """
    path = Path(path)
    languages = _checked_arguments(path, format, lang, pairs_per_prompt, min_rank_gap)
    result = Preferences(source=str(path), paired=format != "kto")
    report = reporter(result, strict)
    if format in TREE_FORMATS:
        _add_tree_pairs(path, format, result, report, languages, pairs_per_prompt, min_rank_gap)
    else:
        _add_records(path, format, result, report)
    return result


def _checked_arguments(path: Path, format, lang, pairs_per_prompt, min_rank_gap) -> set[str] | None:
    """Fail before reading: unknown format, impossible or misplaced mining settings, no file."""
    if format not in PREFERENCE_FORMATS:
        raise DataError(
            "unknown format",
            f"{path}: unknown preference data format {format!r}; "
            f"expected one of {', '.join(PREFERENCE_FORMATS)}",
        )
    if pairs_per_prompt is not None and (not _is_int(pairs_per_prompt) or pairs_per_prompt < 1):
        raise DataError(
            "invalid setting",
            f"data.pairs_per_prompt: {pairs_per_prompt!r} is not a number of pairs; use 1 or more, "
            "or null for every pair",
        )
    if not _is_int(min_rank_gap) or min_rank_gap < 1:
        raise DataError(
            "invalid setting",
            f"data.min_rank_gap: {min_rank_gap!r} must be a whole number, at least 1 "
            "(replies of equal rank make no pair)",
        )
    given = {"data.lang": lang is not None, "data.pairs_per_prompt": pairs_per_prompt is not None}
    return checked_source(path, format, lang, {**given, "data.min_rank_gap": min_rank_gap != 1})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ── prompt/chosen/rejected and prompt/completion/label records ────────────────────────
def _add_records(path: Path, format: str, result: Preferences, report: Report) -> None:
    parse = _pair_record if format == "preference" else _kto_record
    shape_checked = False
    for where, record in read_records(path, report):
        if not shape_checked:
            _check_shape(record, where, format)
            shape_checked = True
        try:
            result.records.append(parse(record))
        except DataError as error:
            report(where, error)


def _check_shape(record: Any, where: str, format: str) -> None:
    """Raise, naming the field, when the first record lacks one that ``format`` needs in every record."""
    if not isinstance(record, dict):
        return  # a bad record, reported as such by the parser
    fields = PAIR_FIELDS if format == "preference" else KTO_FIELDS
    implicit_prompt = format == "preference" and all(
        isinstance(record.get(name), list) for name in ("chosen", "rejected")
    )
    missing = [name for name in fields if name not in record and not (name == "prompt" and implicit_prompt)]
    if not missing:
        return
    if missing == ["prompt"] and format == "preference":
        fix = "add a 'prompt', or make 'chosen' and 'rejected' whole dialogs that begin alike"
    else:
        fix = next(
            (
                fix
                for shape, other, fix in _OTHER_SHAPES
                if other != format and all(f in record for f in shape)
            ),
            "rename the fields, or set data.format to the records' format",
        )
    names = " or ".join(repr(name) for name in missing)
    has = ", ".join(map(str, record)) or "no field"
    raise DataError(
        "missing field",
        f"{where}: no {names} field; format {format!r} needs {', '.join(fields)} in every record, "
        f"and this one has {has}; {fix}",
    )


def _pair_record(record: Any) -> dict:
    _require(record, ("chosen", "rejected"))
    if "prompt" in record:
        prompt = _prompt(record["prompt"])
        chosen, rejected = (
            _completion(record["chosen"], "chosen"),
            _completion(record["rejected"], "rejected"),
        )
    else:
        prompt, chosen, rejected = _implicit_prompt(record["chosen"], record["rejected"])
    if chosen == rejected:
        raise DataError(
            "identical chosen and rejected",
            "'chosen' and 'rejected' are the same reply, so neither is preferred",
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _kto_record(record: Any) -> dict:
    _require(record, KTO_FIELDS)
    if not isinstance(record["label"], bool):
        raise DataError("invalid label", f"'label' must be true or false, got {record['label']!r}")
    prompt, completion = _prompt(record["prompt"]), _completion(record["completion"], "completion")
    return {"prompt": prompt, "completion": completion, "label": record["label"]}


def _require(record: Any, fields: Sequence[str]) -> None:
    if not isinstance(record, dict):
        raise DataError(
            "not an object", f"expected a JSON object with {', '.join(fields)}, got {type(record).__name__}"
        )
    for name in fields:
        if name not in record:
            raise DataError("missing field", f"no {name!r} field in the record")


def _prompt(value: Any) -> list[dict]:
    """A prompt as messages: a string is one user turn; a list must end on the turn to be answered."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = _messages(value, "prompt")
    else:
        raise DataError(
            "invalid prompt", f"'prompt' must be a string or a list of messages, got {type(value).__name__}"
        )
    try:
        validate_messages(messages)
    except ValueError as error:
        raise DataError("invalid message", f"prompt: {error}") from None
    if messages[-1]["role"] not in _PROMPT_ENDS:
        raise DataError(
            "prompt ends without a question",
            f"'prompt' ends on a {messages[-1]['role']!r} turn; it must end on the user (or tool) turn "
            "that the completions answer",
        )
    if isinstance(messages[-1]["content"], str) and not messages[-1]["content"].strip():
        raise DataError("empty text", "the last prompt turn has empty text")
    return messages


def _completion(value: Any, name: str) -> list[dict]:
    """A completion as one assistant message: a string is its text."""
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        messages = _messages(value, name)
    else:
        messages = None
    if not messages or len(messages) != 1 or messages[0]["role"] != "assistant":
        got = f"{len(value)} messages" if isinstance(value, list) else type(value).__name__
        if isinstance(value, list) and len(value) == 1:
            got = f"a {messages[0]['role']!r} message"
        raise DataError(
            "invalid completion", f"{name!r} must be a string or a list of one assistant message, got {got}"
        )
    if not isinstance(messages[0]["content"], str):
        content = type(messages[0]["content"]).__name__
        raise DataError("invalid message", f"{name}: content must be a string, got {content}")
    if not messages[0]["content"].strip():
        raise DataError("empty text", f"{name!r} has empty text")
    return messages


def _messages(value: list, name: str) -> list[dict]:
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                "invalid message",
                f"{name}: message {index}: expected an object, got {type(message).__name__}",
            )
        messages.append({"role": message.get("role"), "content": message.get("content")})
    return messages


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: whole ``chosen``/``rejected`` dialogs share the prompt, then one reply each."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            "missing field", "no 'prompt' field, and 'chosen'/'rejected' are not dialogs to find it in"
        )
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen == rejected:
        raise DataError(
            "identical chosen and rejected",
            "'chosen' and 'rejected' are the same dialog, so neither is preferred",
        )
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise DataError(
            "missing field",
            "no 'prompt' field, and 'chosen' and 'rejected' do not share all but their last message",
        )
    return _prompt(chosen[:-1]), _completion(chosen[-1:], "chosen"), _completion(rejected[-1:], "rejected")


# ── pairs mined from OpenAssistant trees (data.oasst) ─────────────────────────────────
def _add_tree_pairs(path: Path, format, result: Preferences, report: Report, languages, per_prompt, gap):
    roots, left_out = read_trees(path, format, result, report)
    for root in oasst.kept_trees(roots, languages, left_out):
        pairs = tree_pairs(root, pairs_per_prompt=per_prompt, min_rank_gap=gap, skipped=result.drop)
        if not pairs:
            detail = f"tree {root.tree_id}: no prompt has two ranked replies {gap} or more ranks apart"
            result.drop(root.where, "no ranked pair", detail)
        result.records += pairs


def tree_pairs(
    root: oasst.Message,
    *,
    pairs_per_prompt: int | None = None,
    min_rank_gap: int = 1,
    skipped: Callable[[str, str, str], None] | None = None,
) -> list[dict]:
    """Preference pairs of a pruned tree (``oasst.prune``), prompts in depth-first order.

    At each prompter message, its ranked assistant replies pair up: the better-ranked (lower ``rank``)
    is chosen, the other rejected, when their ranks differ by ``min_rank_gap`` or more. The prompt is
    the actual path from the root to that prompter message. Pairs come widest rank gap first (the best
    against the worst), then the better chosen reply first, then file order, and at most
    ``pairs_per_prompt`` of them (None: every one). Unranked replies join no pair; one that had
    siblings is reported to ``skipped(where, "unranked reply", detail)``.
    """
    pairs, stack = [], [[root]]
    while stack:
        path = stack.pop()
        asked = path[-1].role == "prompter"  # replies to an assistant message answer no question
        replies = [reply for reply in path[-1].replies if asked and reply.role == "assistant"]
        ranked = sorted((reply for reply in replies if reply.rank is not None), key=lambda reply: reply.rank)
        if skipped is not None and len(replies) > 1:
            for reply in replies:
                if reply.rank is None:
                    detail = (
                        f"message {reply.id} has no rank, so it is in no pair with its {len(replies) - 1}"
                    )
                    skipped(reply.where, "unranked reply", f"{detail} sibling{'s' * (len(replies) > 2)}")
        candidates = [
            (better, worse)
            for index, better in enumerate(ranked)
            for worse in ranked[index + 1 :]
            if worse.rank - better.rank >= min_rank_gap
        ]
        candidates.sort(key=lambda pair: pair[1].rank - pair[0].rank, reverse=True)  # stable
        prompt = oasst.as_messages(path)
        for better, worse in candidates[:pairs_per_prompt]:
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": oasst.as_messages([better]),
                    "rejected": oasst.as_messages([worse]),
                }
            )
        stack.extend([*path, reply] for reply in reversed(path[-1].replies))
    return pairs


# ── pairs → KTO's labelled completions ────────────────────────────────────────────────
def unpaired(preferences: Preferences) -> Preferences:
    """The pairs as KTO records, as TRL's ``unpair_preference_dataset`` makes them (chosen desirable,
    rejected not), but each (prompt, completion) once.

    A completion both chosen and rejected (an OpenAssistant reply ranked between two siblings) teaches
    nothing certain, so it is left out and counted as "labelled both ways".
    """
    if not preferences.paired:
        return preferences
    result = Preferences(
        source=preferences.source,
        dropped=preferences.dropped.copy(),
        examples=list(preferences.examples),
        paired=False,
    )
    labels: dict[str, set[bool]] = {}
    first: dict[str, dict] = {}
    for pair in preferences.records:
        for name, label in (("chosen", True), ("rejected", False)):
            key = json.dumps([pair["prompt"], pair[name]], ensure_ascii=False)
            labels.setdefault(key, set()).add(label)
            first.setdefault(key, {"prompt": pair["prompt"], "completion": pair[name], "label": label})
    for key, record in first.items():
        if len(labels[key]) == 1:
            result.records.append(record)
        else:
            reply = record["completion"][0]["content"]
            detail = f"the reply {reply[:40]!r}{'…' * (len(reply) > 40)} is chosen in one pair, "
            detail += "rejected in another"
            result.drop(preferences.source, "labelled both ways", detail)
    return result
