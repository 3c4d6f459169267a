"""What preparing a source made of it: counts, drops by reason with the first of each, a length histogram.

The encoder (``data.rows``) fills the counts and the histogram; the pipeline (``data.prepare``) adds what
the reader left out and where the dataset was saved, and keeps the summary beside it in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PrepareSummary:
    """What prepare made of a chat source: counts, drops by reason, and a length histogram."""

    source: str
    conversations: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    length_histogram: dict[str, int] = field(default_factory=dict)
    path: str = ""
    held_out: str = ""  # what evaluates the run, when something does (data.prepare_from_config)

    def __str__(self) -> str:
        lines = [
            f"{self.source}",
            f"  {self.conversations} conversations, {self.tokens:,} tokens, "
            f"{self.trainable_tokens:,} trainable ({self.trainable_tokens / max(self.tokens, 1):.0%}), "
            f"{self.truncated} truncated",
        ]
        return "\n".join(lines + summary_details(self, "tokens"))


@dataclass
class PreferenceSummary:
    """What prepare made of a preference source: rows, tokens, drops by reason, and a length histogram."""

    source: str
    objective: str
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    desirable: int = 0  # kto: rows labelled true
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    length_histogram: dict[str, int] = field(default_factory=dict)  # longest sequence of each row
    path: str = ""
    held_out: str = ""  # what evaluates the run, when something does (data.prepare_from_config)

    def __str__(self) -> str:
        kind = "pairs" if self.objective in ("dpo", "rm") else "completions"
        lines = [
            f"{self.source}",
            f"  {self.rows} {kind}, {self.prompt_tokens:,} prompt tokens, "
            f"{self.completion_tokens:,} completion tokens, {self.truncated} truncated",
        ]
        if self.objective == "kto":
            lines.append(f"  {self.desirable} desirable, {self.rows - self.desirable} undesirable")
        return "\n".join(lines + summary_details(self, "tokens of prompt + longest completion"))


def summary_details(summary: PrepareSummary | PreferenceSummary, lengths: str) -> list[str]:
    """The lines a summary ends with: drops by reason, the first of each, a histogram of
    ``summary.length_histogram`` (``lengths`` says what was measured), and where it was saved."""
    lines = drop_lines(summary)
    widest = max(summary.length_histogram.values(), default=1)
    lines.append(f"  length ({lengths}, before truncation):")
    lines += [
        f"    {bucket:>13} {count:>7} {'█' * round(30 * count / widest)}"
        for bucket, count in summary.length_histogram.items()
    ]
    if summary.path:
        lines.append(f"  saved in {summary.path}")
    if summary.held_out:
        lines.append(f"  {summary.held_out}")
    return lines


def drop_lines(summary) -> list[str]:
    """What a reader or encoder left out, by reason (``summary.dropped``), and the first of each."""
    lines = [f"  dropped {count} × {reason}" for reason, count in summary.dropped.items()]
    return lines + [f"    e.g. {example}" for example in summary.examples]


def length_histogram(lengths: Sequence[int] | np.ndarray, max_length: int) -> dict[str, int]:
    """Counts per power-of-two bucket, with everything over max_length in its own bucket."""
    bounds = [2**k for k in range(5, 32) if 2**k < max_length] + [max_length]
    # the first bound at or above each length; len(bounds): over max_length
    counts = np.bincount(np.searchsorted(bounds, np.asarray(lengths, np.int64)), minlength=len(bounds) + 1)
    names = [f"≤{b}" for b in bounds] + [f">{max_length}"]
    return {name: int(count) for name, count in zip(names, counts, strict=True) if count}


@dataclass
class SourceShare:
    """One source's part of a mixture (``data.sources``), in rows."""

    source: str
    weight: str  # "fraction 0.3", "rows 500", "all": what the config asked
    read: int  # what preparing it gave: kept + dropped (by the reader or the encoder)
    dropped: int
    kept: int
    held_out: int  # kept rows whose group is held out for evaluation (by this source or another)
    taken: int  # rows of the mixture from it
    passes: int = 0  # with repeat: whole passes over its training rows before the last, sampled, part

    def __str__(self) -> str:
        available = self.kept - self.held_out
        repeats = (
            f" ({self.passes} whole passes + {self.taken - self.passes * available})" if self.passes else ""
        )
        return (
            f"{self.source} ({self.weight}): {self.read} read, {self.dropped} dropped, {self.kept} kept, "
            f"{self.held_out} held out, {self.taken} taken{repeats}"
        )


@dataclass
class MixtureSummary:
    """What prepare made of a mixture: each source's share, and each source's own summary."""

    shares: list[SourceShare]
    sources: list[PrepareSummary | PreferenceSummary]
    seed: int
    held_out: str = ""  # the evaluation rows: one line

    @property
    def rows(self) -> int:
        return sum(share.taken for share in self.shares)

    def __str__(self) -> str:
        lines = [f"mixture of {len(self.shares)} sources: {self.rows} training rows (seed {self.seed})"]
        lines += [f"  {share}" for share in self.shares]
        if self.held_out:
            lines.append(f"  {self.held_out}")
        for summary in self.sources:
            lines += ["  " + line for line in str(summary).splitlines()]
        return "\n".join(lines)
