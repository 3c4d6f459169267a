"""Build ``oasst_reply_choice.jsonl``, the data of the ``oasst_reply_choice`` task, from the shipped sample.

    python -m train.eval_tasks.oasst_reply_choice        # rewrites oasst_reply_choice.jsonl beside this file

Each item is an English conversation's opening user prompt from ``data/samples/oasst_sample.jsonl``; its
choices are the real assistant reply and the opening replies of three other items, in an order drawn from a
fixed seed, so the file is the same on every run. Distractors come from the same language (English only): a
reply in another language would give the answer away.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.config import SAMPLES_DIR

SOURCE = SAMPLES_DIR / "oasst_sample.jsonl"
OUTPUT = Path(__file__).resolve().parent / "oasst_reply_choice.jsonl"
ITEMS = 24  # a smoke benchmark: seconds on a CPU for the tiny model
CHOICES = 4  # chance is 1/4
SEED = 0


def opening_turns(source: Path, lang: str = "en") -> list[dict]:
    """``{"id", "prompt", "reply"}`` for each conversation in ``lang`` that opens with a user turn answered by
    the assistant, in file order, each prompt once."""
    turns, seen = [], set()
    for line in source.read_text().splitlines():
        record = json.loads(line)
        first, second = record["messages"][:2]
        if record["lang"] != lang or (first["role"], second["role"]) != ("user", "assistant"):
            continue
        if first["content"] not in seen:
            seen.add(first["content"])
            turns.append({"id": record["id"], "prompt": first["content"], "reply": second["content"]})
    return turns


def build_items(source: Path = SOURCE, items: int = ITEMS, seed: int = SEED) -> list[dict]:
    """The task's records: ``{"id", "prompt", "choices", "gold"}``, ``choices[gold]`` the real reply."""
    turns = opening_turns(source)[:items]
    rng = random.Random(seed)
    records = []
    for index, turn in enumerate(turns):
        others = [other["reply"] for position, other in enumerate(turns) if position != index]
        choices = [turn["reply"], *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        gold = choices.index(turn["reply"])
        records.append({"id": turn["id"], "prompt": turn["prompt"], "choices": choices, "gold": gold})
    return records


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


if __name__ == "__main__":
    OUTPUT.write_text(jsonl(build_items()))
    print(f"wrote {OUTPUT}")
