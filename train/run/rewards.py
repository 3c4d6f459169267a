"""Reward functions for stage=grpo, named in the config by import path (``stage.rewards``).

Each is called by TRL's GRPOTrainer once per batch of completions, as TRL calls every reward function:
``f(prompts=..., completions=..., completion_ids=..., **columns)``, where ``columns`` are the prompt rows'
other fields (an ``answer`` column reaches ``exact_answer`` as ``answer``), each a list with one entry per
completion; it returns one float per completion (None: not applicable to that one). The settings a config
gives beside ``_target_`` (other than ``weight``) are bound as keyword arguments. Your own function: any
importable callable of that shape, ``stage.rewards=[{_target_: mypackage.rewards.brevity, weight: 0.5}]``.

Completions are conversational (``[{"role": "assistant", "content": ...}]``) when the prompts are chats,
which is how this project hands prompts to TRL; ``text_of`` takes either shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def text_of(completion) -> str:
    """A completion's text: a string as it is, a conversational completion's contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def ends_at_eot(completion_ids: Sequence[Sequence[int]], eot_id: int = 128009, **_) -> list[float]:
    """1.0 for a completion that ended its turn (``<|eot_id|>``, the Llama 3.1 Instruct end of turn), 0.0 for
    one cut at ``max_completion_length`` or ended otherwise. TRL strips nothing from ``completion_ids``: the
    stop token is their last id when generation stopped on it."""
    return [1.0 if ids and ids[-1] == eot_id else 0.0 for ids in completion_ids]


def length_within(
    completion_ids: Sequence[Sequence[int]], min_tokens: int = 1, max_tokens: int = 256, **_
) -> list[float]:
    """1.0 for a completion of ``min_tokens`` to ``max_tokens`` tokens (its stop token not counted), else
    0.0."""
    lengths = [len(ids) - (1 if ids and ids[-1] in _STOP_IDS else 0) for ids in completion_ids]
    return [1.0 if min_tokens <= length <= max_tokens else 0.0 for length in lengths]


def exact_answer(completions, answer: Sequence | None = None, **_) -> list[float | None]:
    """1.0 when the last number in the completion equals the row's ``answer`` (compared as numbers: "7",
    "7.0" and " 7." agree), else 0.0; None for a row without an answer. The check of verifiable-reward
    GRPO on arithmetic and GSM8K-style data: only the final number counts."""
    if answer is None:
        raise ValueError(
            "exact_answer: the prompts have no 'answer' column; give each record of a format: prompts file "
            "an answer (data=arithmetic_sample has one)"
        )
    scores: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            scores.append(None)
            continue
        found = NUMBER.findall(text_of(completion))
        scores.append(1.0 if found and _same_number(found[-1], str(expected)) else 0.0)
    return scores


def _same_number(got: str, expected: str) -> bool:
    try:
        return float(got) == float(expected.strip().rstrip("."))
    except ValueError:
        return got == expected.strip()


def digit_share(completions, **_) -> list[float]:
    """The share of a completion's visible characters that are digits: 1.0 for a reply that is a number
    alone, as "Answer with the number only" asks. A format reward with a signal from the first step: a
    random model's samples hold a few digits, more in some completions than in others."""
    scores = []
    for completion in completions:
        visible = [character for character in text_of(completion) if not character.isspace()]
        scores.append(sum(character.isdigit() for character in visible) / len(visible) if visible else 0.0)
    return scores


def latin_share(completions, **_) -> list[float]:
    """The share of a completion's letters that are ASCII Latin ones: DeepSeek-R1's language-consistency
    reward (the share of the target language's words in the reply) for English. 0.0 for no letter at all.
    A toy a random model can learn from its first step: its samples mix scripts from the whole vocabulary."""
    scores = []
    for completion in completions:
        letters = [character for character in text_of(completion) if character.isalpha()]
        scores.append(sum(character.isascii() for character in letters) / len(letters) if letters else 0.0)
    return scores


class RewardModel:
    """A reward model a stage=rm run trained (its ``model/`` or ``adapter/``), scoring each prompt with its
    completion as one Llama 3.1 chat, on this process's device, in the run's compute dtype. Built once
    per run; TRL calls it like the functions above."""

    def __init__(self, run: str, batch_size: int = 8):
        import torch

        from data import tokenizer_for
        from train.model.build import build_model, compute_dtype, load_checkpoint
        from train.run.outputs import final_dir
        from train.run.run_dir import run_config

        run_dir = Path(run)
        config = run_config(run_dir)
        if config.stage.name != "rm":
            raise ValueError(f"{run_dir} is a stage={config.stage.name} run, not a reward model (stage=rm)")
        self.__name__ = f"reward_model({run_dir.name})"  # TRL logs each reward under its function's name
        self.tokenizer = tokenizer_for(config.model)
        dtype = compute_dtype(config.model.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = final_dir(run_dir, config.method.name)
        if config.method.name == "full":
            model = load_checkpoint(str(weights), dtype, "sdpa", reward=True)
        else:
            from peft import PeftModel

            from train.export import base_of

            base, seed = base_of(config)
            model = build_model(base, self.tokenizer, dtype=dtype, seed=seed, reward=True)
            model = PeftModel.from_pretrained(model, weights).merge_and_unload()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size

    def __call__(self, prompts, completions, **_) -> list[float]:
        import torch

        from data import encode_chat

        chats = [
            [*prompt, *completion] if not isinstance(prompt, str) else _as_chat(prompt, completion)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        sequences = [encode_chat(chat, self.tokenizer)["input_ids"] for chat in chats]
        scores = []
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(sequences), self.batch_size):
                batch = sequences[start : start + self.batch_size]
                width = max(map(len, batch))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)
                mask = (ids != pad).long()  # the pad token is never inside an encoded chat
                scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


def _as_chat(prompt: str, completion) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": text_of(completion)}]


# data.tokenizer.STOP_TOKENS' ids in the Llama 3 tokenizer (tests/test_grpo.py holds them to it)
_STOP_IDS = {128001, 128008, 128009}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
