"""Prepare throughput: our encoder against TRL's own dataset preparation, side by side.

Builds a few thousand OASST-style conversations (2-4 exchanges, messages mixed sentence by
sentence from the shipped multilingual sample), writes them as `messages` JSONL, then times
  - ours: ``data.prepare_dataset`` (read JSONL → exact Llama 3.1 ids + assistant masks → saved), and
  - TRL:  ``load_dataset("json")`` + SFTTrainer's own preparation of a `messages` dataset with the
          official template (TRL 1.16 refuses ``assistant_only_loss=True`` with that template, so its
          rows carry no assistant mask at all),
both with the same number of processes (best of three cold runs each), and checks that the
token ids agree row for row.

    python bench/prepare.py [--conversations 3000] [--num-proc 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3  # each side's best of three cold runs (fresh caches), to damp this machine's noise


def generate(count: int, seed: int = 0) -> list[list[dict]]:
    """Conversations of 2-4 exchanges whose messages are new mixes of the sample's sentences.

    Messages are recombined sentence by sentence, so almost every text is unique, as in real
    data: neither side can win from tokenizing repeated strings.
    """
    conversation = conversation_maker(seed)
    return [conversation() for _ in range(count)]


def conversation_maker(seed: int = 0):
    """A function that returns a new conversation of ``generate``'s kind at each call."""
    import re

    from data import load_conversations

    pool = load_conversations(REPO / "data/samples/oasst_sample.jsonl", "messages").conversations
    sentences = {"user": [], "assistant": []}
    for conversation in pool:
        for message in conversation:
            if message["role"] in sentences:
                sentences[message["role"]] += [
                    s for s in re.split(r"(?<=[.!?।])\s+", message["content"]) if s
                ]
    rng = random.Random(seed)

    def message(role: str, most: int) -> dict:
        return {"role": role, "content": " ".join(rng.sample(sentences[role], rng.randint(1, most)))}

    def conversation() -> list[dict]:
        return [m for _ in range(rng.randint(2, 4)) for m in (message("user", 2), message("assistant", 6))]

    return conversation


def time_ours(path: Path, tokenizer, num_proc: int, cache: Path):
    from data import prepare_dataset

    start = time.perf_counter()
    dataset, summary = prepare_dataset(
        path, "messages", tokenizer, max_length=8192, num_proc=num_proc, cache_dir=cache
    )
    return time.perf_counter() - start, dataset


def trl_trainer(tokenizer, workdir: Path, num_proc: int, **extra):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    args = SFTConfig(
        output_dir=str(workdir / "trl"), max_length=8192, dataset_num_proc=num_proc, report_to=[], bf16=False,
        use_cpu=not torch.cuda.is_available(), **extra,
    )  # fmt: skip
    warmup = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    )
    return SFTTrainer(model=model, args=args, train_dataset=warmup, processing_class=tokenizer)


def time_trl(path: Path, tokenizer, num_proc: int, workdir: Path):
    from datasets import load_dataset

    trainer = trl_trainer(tokenizer, workdir, num_proc)
    best = float("inf")
    for attempt in range(REPEATS):
        start = time.perf_counter()
        raw = load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(workdir / f"hf{attempt}")
        )
        dataset = trainer._prepare_dataset(raw, tokenizer, trainer.args, False, None, "bench")
        best = min(best, time.perf_counter() - start)
    return best, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--num-proc", type=int, default=1)
    options = parser.parse_args()

    from data import load_tokenizer

    tokenizer = load_tokenizer()
    conversations = generate(options.conversations)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "chats.jsonl"
        path.write_text(
            "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations)
        )
        trl_seconds, trl_rows = time_trl(path, tokenizer, options.num_proc, workdir)
        our_seconds, our_rows = time_ours(path, tokenizer, options.num_proc, workdir / "cache")
        try:
            trl_trainer(tokenizer, workdir, options.num_proc, assistant_only_loss=True)
            trl_masks = "accepted"
        except Exception as error:  # what TRL says about the official template
            trl_masks = f"refused: {str(error).splitlines()[0][:90]}..."

    tokens = sum(len(ids) for ids in our_rows["input_ids"])
    agree = sum(a == b for a, b in zip(our_rows["input_ids"], trl_rows["input_ids"], strict=True))
    rows = [
        ("wall time (s)", f"{trl_seconds:.2f}", f"{our_seconds:.2f}"),
        (
            "conversations/s",
            f"{len(conversations) / trl_seconds:,.0f}",
            f"{len(conversations) / our_seconds:,.0f}",
        ),
        ("tokens/s", f"{tokens / trl_seconds:,.0f}", f"{tokens / our_seconds:,.0f}"),
        ("assistant-only loss masks", trl_masks if len(trl_masks) < 20 else "no (see below)", "yes"),
    ]
    print(f"{len(conversations)} conversations, {tokens:,} tokens, num_proc={options.num_proc}")
    print(f"{'':<28}{'TRL SFTTrainer':>18}{'ours':>14}")
    for name, theirs, ours in rows:
        print(f"{name:<28}{theirs:>18}{ours:>14}")
    print(f"speed-up: {trl_seconds / our_seconds:.1f}x")
    print(f"token ids identical in {agree}/{len(conversations)} rows")
    print(f"TRL with assistant_only_loss=True and the official template: {trl_masks}")


if __name__ == "__main__":
    main()
