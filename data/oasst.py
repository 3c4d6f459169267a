"""OpenAssistant conversation trees (oasst1, oasst2): exported messages → trees → threads.

The exports come flat (``*.messages.jsonl.gz``: one message a line, linked by ``parent_id``)
or nested (``*.trees.jsonl.gz``: one tree a line, each message holding its ``replies``).
The exporter leaves out fields that are None (oasst-data writes with ``exclude_none``), so a
missing ``parent_id``, ``rank``, ``review_result`` or ``replies`` means None.

No files here: ``data.readers`` hands in the decoded records, each with where it came from,
and a ``left_out(where, reason, detail)`` callback that counts (or, in strict mode, raises on)
whatever cannot become part of a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

ROLES = {"prompter": "user", "assistant": "assistant"}
THREAD_POLICIES = ("best", "all")
# Left out by design (the export's own verdicts, data.lang, trees nobody answered): counted,
# never treated as bad data, even with data.strict.
BY_DESIGN = ("deleted", "failed review", "language filtered", "no assistant turn")

LeftOut = Callable[[str, str, str], None]  # (where, reason, detail)


@dataclass(eq=False)
class Message:
    """One exported message, its fields as found (checked later by ``exclusion``), and its replies."""

    id: str
    parent_id: Any
    tree_id: Any
    role: Any
    text: Any
    lang: Any
    rank: Any
    deleted: bool
    review_result: Any
    where: str  # the record it came from: file:line (flat: its own line; nested: its tree's line)
    replies: list[Message] = field(default_factory=list)


def flat_roots(records: Iterable[tuple[str, Any]], left_out: LeftOut) -> list[Message]:
    """The trees of a flat message export (one message a record), linked by ``parent_id``.

    Messages that cannot join a tree are left out: no id ("invalid message"), an id seen
    before ("duplicate message id", the first is kept), or a parent not in the records
    ("missing parent", counted once with the replies below it).
    """
    messages, seen = [], set()
    for where, record in records:
        try:
            message = message_from_record(record, where)
        except ValueError as error:
            left_out(where, "invalid message", str(error))
            continue
        if message.id in seen:
            left_out(where, "duplicate message id", f"message {message.id} appeared before; that one is kept")
            continue
        seen.add(message.id)
        messages.append(message)
    roots, orphans, looped = link(messages)
    for message in orphans:
        detail = f"message {message.id}: its parent {message.parent_id} is not in the file"
        left_out(message.where, "missing parent", _with_replies(detail, message))
    for message in looped:
        left_out(message.where, "missing parent", f"message {message.id}: its parents loop and reach no root")
    return roots


def nested_roots(records: Iterable[tuple[str, Any]], left_out: LeftOut) -> list[Message]:
    """The trees of a nested tree export (one tree a record); a record that is no tree is left out."""
    roots = []
    for where, record in records:
        try:
            roots.append(tree_from_record(record, where))
        except ValueError as error:
            left_out(where, "invalid tree", str(error))
    return roots


def message_from_record(record: Any, where: str) -> Message:
    """A Message from one exported message object, without its replies.

    Raises ValueError only when the record has no ``message_id`` to name it by; every other
    defect is kept on the Message for ``exclusion`` to report, so its replies go with it.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a message object, got {type(record).__name__}")
    if not isinstance(record.get("message_id"), str):
        raise ValueError("no 'message_id' string in the message")
    return Message(
        id=record["message_id"],
        parent_id=record.get("parent_id"),
        tree_id=record.get("message_tree_id"),
        role=record.get("role"),
        text=record.get("text"),
        lang=record.get("lang"),
        rank=_rank(record.get("rank")),
        deleted=bool(record.get("deleted")),
        review_result=record.get("review_result"),
        where=where,
    )


def _rank(rank: Any) -> Any:
    # pandas writes a missing rank as NaN, which would compare false with every rank.
    return None if isinstance(rank, float) and rank != rank else rank


def tree_from_record(record: Any, where: str) -> Message:
    """The root prompt of one nested tree record, with its replies attached in file order.

    Raises ValueError when the record is not a tree: no ``prompt`` object, or ``replies`` that
    are not a list of message objects.
    """
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), dict):
        raise ValueError("no 'prompt' message object in the tree record")
    root = message_from_record(record["prompt"], where)
    root.tree_id = record.get("message_tree_id", root.tree_id)
    stack = [(root, record["prompt"])]
    while stack:
        message, message_record = stack.pop()
        replies = message_record.get("replies") or []
        if not isinstance(replies, list):
            raise ValueError(f"message {message.id}: 'replies' must be a list, got {type(replies).__name__}")
        for reply_record in replies:
            reply = message_from_record(reply_record, where)
            message.replies.append(reply)
            stack.append((reply, reply_record))
    return root


def link(messages: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """Attach each flat message to its parent's replies, in file order; ids must be unique.

    Returns (roots, orphans, looped): orphans name a ``parent_id`` that is not among ``messages``
    (their replies stay attached to them); looped messages have parents that chain in a circle
    and never reach a root.
    """
    by_id = {message.id: message for message in messages}
    roots, orphans = [], []
    for message in messages:
        if message.parent_id is None:
            roots.append(message)
        elif message.parent_id in by_id:
            by_id[message.parent_id].replies.append(message)
        else:
            orphans.append(message)
    reached = {id(message) for message in walk(roots + orphans)}
    return roots, orphans, [message for message in messages if id(message) not in reached]


def conversations(
    roots: list[Message], languages: set[str] | None, policy: str, left_out: LeftOut
) -> list[list[dict]]:
    """Every tree's threads (see ``threads``) as chat messages, in file order.

    A tree whose root prompt's ``lang`` is not in ``languages`` (None keeps all) is left out
    whole, as is a tree left with no assistant reply once excluded messages are pruned.
    """
    found = []
    for root in kept_trees(roots, languages, left_out):
        tree_threads = threads(root, policy)
        if not tree_threads:
            left_out(
                root.where, "no assistant turn", f"tree {root.tree_id}: no assistant reply to its prompt"
            )
        found += [as_messages(thread) for thread in tree_threads]
    return found


def kept_trees(roots: list[Message], languages: set[str] | None, left_out: LeftOut) -> Iterator[Message]:
    """The trees whose root prompt's ``lang`` is in ``languages`` (None keeps all), each pruned (``prune``).

    A tree in another language is left out whole ("language filtered"), as is one whose root is excluded.
    """
    for root in roots:
        if languages is not None and root.lang not in languages:
            detail = f"tree {root.tree_id}: language {root.lang!r} is not in data.lang"
            left_out(root.where, "language filtered", detail)
        elif prune(root, left_out) is not None:
            yield root


def prune(root: Message, left_out: LeftOut) -> Message | None:
    """Remove every excluded message with its whole subtree, in place; None when the root goes.

    ``left_out`` is called once per removed subtree, for its top message: the replies below it
    are named in the detail, not counted again.
    """

    def keep(message: Message) -> bool:
        excluded = exclusion(message)
        if excluded:
            reason, detail = excluded
            left_out(message.where, reason, _with_replies(detail, message))
        return not excluded

    if not keep(root):
        return None
    stack = [root]
    while stack:
        message = stack.pop()
        message.replies = [reply for reply in message.replies if keep(reply)]
        stack.extend(reversed(message.replies))
    return root


def exclusion(message: Message) -> tuple[str, str] | None:
    """Why ``message`` (and with it every reply below it) stays out of all threads, or None.

    Returns (reason, detail). "deleted" and "failed review" are the export's own verdicts, so
    they come first: a deleted message is counted as deleted, whatever else is wrong with it.
    """
    name = f"message {message.id}"
    if message.deleted:
        return "deleted", f"{name} is deleted"
    if message.review_result is False:
        return "failed review", f"{name} failed review"
    if message.role not in ROLES:
        return "unknown role", f"{name}: unknown role {message.role!r}; expected prompter or assistant"
    if not isinstance(message.text, str):
        return "invalid message", f"{name}: 'text' must be a string, got {type(message.text).__name__}"
    if not message.text.strip():
        return "empty text", f"{name} has empty text"
    if message.rank is not None and (
        isinstance(message.rank, bool) or not isinstance(message.rank, int | float)
    ):
        return "invalid message", f"{name}: 'rank' must be a number or null, got {message.rank!r}"
    return None


def _with_replies(detail: str, message: Message) -> str:
    below = sum(1 for _ in walk(message.replies))
    if not below:
        return detail
    return f"{detail} (left out with the {below} message{'s' if below > 1 else ''} below it)"


def walk(messages: list[Message]) -> Iterator[Message]:
    """Every message in these subtrees (each subtree's root first)."""
    stack = list(reversed(messages))
    while stack:
        message = stack.pop()
        yield message
        stack.extend(reversed(message.replies))


def threads(root: Message, policy: str) -> list[list[Message]]:
    """The threads of a pruned tree, each cut back so it ends on an assistant message.

    "best": one thread following the best-ranked reply at each step (lowest ``rank``; a ranked
    reply before an unranked one; then file order). "all": one per root-to-leaf path; a path
    ending on a prompter leaf is cut back, and one that is then equal to another is kept once
    (as Open-Assistant's own SFT loader does). Empty when no assistant message is reachable.
    """
    paths = [best_path(root)] if policy == "best" else all_paths(root)
    by_last: dict[int, list[Message]] = {}
    for path in paths:
        while path and path[-1].role != "assistant":
            path = path[:-1]
        if path:
            by_last.setdefault(id(path[-1]), path)
    return list(by_last.values())


def best_path(root: Message) -> list[Message]:
    path = [root]
    while path[-1].replies:
        path.append(min(path[-1].replies, key=_rank_order))  # min keeps the first of equals
    return path


def _rank_order(message: Message) -> tuple[bool, float]:
    return (message.rank is None, message.rank if message.rank is not None else 0)


def all_paths(root: Message) -> list[list[Message]]:
    paths, stack = [], [[root]]
    while stack:
        path = stack.pop()
        if not path[-1].replies:
            paths.append(path)
        stack.extend([*path, reply] for reply in reversed(path[-1].replies))
    return paths


def as_messages(thread: list[Message]) -> list[dict]:
    """A thread as chat messages: prompter → user."""
    return [{"role": ROLES[message.role], "content": message.text} for message in thread]
