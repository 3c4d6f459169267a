"""What the model now says: greedy generations for a few fixed prompts at each evaluation and at the end,
in ``samples.jsonl`` (one ``{"step", "prompt", "completion"}`` a line) and, as TRL logs them, wandb.

Built on TRL's ``LogCompletionsCallback`` (its wandb/Comet table, its generation across ranks, ZeRO-3 and
FSDP included): only the prompts are ours. TRL tokenizes each prompt text with the tokenizer, which puts
``<|begin_of_text|>`` first, so a prompt here is the Llama 3.1 text after it, up to the assistant header
the reply follows: re-tokenized, exactly the ids ``data.encode_chat`` gives (tests/test_samples.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from transformers import GenerationConfig
from trl.trainer.callbacks import LogCompletionsCallback

from data import encode_chat
from data.tokenizer import BOS, stop_token_ids

SAMPLES_FILE = "samples.jsonl"
_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def prompt_text(ids: list[int], tokenizer) -> str:
    """A chat's opening turns, from its token ids up to (and with) its first assistant header: the text TRL
    tokenizes, less the ``<|begin_of_text|>`` the tokenizer adds itself."""
    header = tokenizer.encode(_ASSISTANT, add_special_tokens=False)
    end = next(i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header)
    text = tokenizer.decode(ids[:end])
    return text.removeprefix(BOS)


def user_prompt_text(message: str, tokenizer) -> str:
    """``message`` as a one-turn Llama 3.1 chat waiting for its reply (``prompt_text``)."""
    ids = encode_chat([{"role": "user", "content": message}, {"role": "assistant", "content": ""}], tokenizer)
    return prompt_text(ids["input_ids"], tokenizer)


class SampleGenerations(LogCompletionsCallback):
    """TRL's ``LogCompletionsCallback`` with Llama 3.1 prompts, greedy decoding that stops at the end of a
    turn, a generation at the last step too, and every row appended to ``samples.jsonl`` by rank 0."""

    def __init__(self, trainer, prompts: list[str], path: Path, max_new_tokens: int):
        tokenizer = trainer.processing_class
        generation = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        super().__init__(trainer, generation_config=generation)
        # TRL reads self.eval_dataset["prompt"] and lets accelerate split it between the ranks; a datasets 4
        # Dataset gives a Column there, which split_between_processes does not split: every rank would
        # generate every prompt and the gathered rows repeat world-size times. A list is split.
        self.eval_dataset = {"prompt": list(prompts)}
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if (
            state.is_world_process_zero and self.path.is_file()
        ):  # resumed: what came after the checkpoint goes
            rows = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line)["step"] <= state.global_step
            ]
            self.path.write_text("".join(row + "\n" for row in rows))

    def on_step_end(self, args, state, control, **kwargs):
        tokenizer = kwargs["processing_class"]
        padding_side, logged = tokenizer.padding_side, len(self.table)
        self.freq = 1 if state.global_step >= state.max_steps else None  # None: every eval_steps (TRL's)
        super().on_step_end(args, state, control, **kwargs)
        tokenizer.padding_side = padding_side  # TRL leaves it "left"; training batches and saves keep ours
        if state.is_world_process_zero and len(self.table) > logged:
            with self.path.open("a") as file:
                for step, prompt, completion in self.table[logged:]:
                    file.write(
                        json.dumps({"step": int(step), "prompt": prompt, "completion": completion}) + "\n"
                    )


def sample_prompts(samples, eval_dataset: Dataset, tokenizer) -> list[str]:
    """``samples.prompts`` as one-turn chats, or the opening turns of the first ``samples.count`` held-out
    conversations (SFT rows' ``input_ids``; preference rows' ``prompt_ids``)."""
    if samples.prompts:
        return [user_prompt_text(prompt, tokenizer) for prompt in samples.prompts]
    column = "input_ids" if "input_ids" in eval_dataset.column_names else "prompt_ids"
    rows = eval_dataset.select(range(min(samples.count, len(eval_dataset))))[column]
    if column == "prompt_ids":  # a preference prompt ends before the reply's header: add it
        header = tokenizer.encode(_ASSISTANT, add_special_tokens=False)
        rows = [ids if ids[-len(header) :] == header else [*ids, *header] for ids in rows]
    return [prompt_text(ids, tokenizer) for ids in rows]
