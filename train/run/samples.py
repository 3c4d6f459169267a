"""What the model now says: greedy generations for a few fixed prompts at each evaluation and at the end,
in ``samples.jsonl`` (one ``{"step", "prompt", "completion"}`` a line) and, as TRL's
``LogCompletionsCallback`` logs them, a wandb/Comet table named ``completions``.

Every rank takes part in each generation, whatever the number of prompts, and a sharded model is never
gathered whole (``complete_on_every_rank``). The prompts are Llama 3.1 text: the tokenizer puts
``<|begin_of_text|>`` first, so a prompt here is the text after it, up to the assistant header the reply
follows: re-tokenized, exactly the ids ``data.encode_chat`` gives (tests/test_samples.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import GenerationConfig, TrainerCallback
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

from data import encode_chat
from data.tokenizer import BOS, stop_token_ids

SAMPLES_FILE = "samples.jsonl"
COLUMNS = ("step", "prompt", "completion")  # a samples.jsonl line's keys, the table's columns
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


def complete_on_every_rank(
    model, prompts: list[str], tokenizer, generation: GenerationConfig, *, batch_size: int, synced_gpus: bool
) -> list[str]:
    """The greedy completion of each of ``prompts``, in order, on every rank, with every rank generating:
    where parameters are sharded each forward step is a collective, so a rank that sat one out would
    leave the others waiting. Call it on every rank with the same ``prompts``.

    Stands in for the generation in TRL's ``LogCompletionsCallback.on_step_end`` (TRL 1.16,
    trl/trainer/callbacks.py:327-339, and ``_generate_completions`` :98-112). TRL splits the prompts with
    accelerate's ``split_between_processes``, which gives ranks past the number of prompts none: they go
    to ``gather_object`` while the others all-gather parameters in ``generate`` (2 CPU processes, 1 prompt:
    FSDP aborts with gloo's "collective mismatch", ZeRO-3 hangs). Here each rank takes an equal share,
    padded with the last prompt (accelerate 1.15's ``apply_padding``, accelerate/state.py:480-490), so
    every rank calls ``generate`` as often as the others, and drops the padding's completions before the
    gather. ``synced_gpus`` keeps a rank whose replies all stopped at ``<|eot_id|>`` stepping until every
    rank's have; transformers 5.25 infers it (transformers/generation/utils.py:2569) from a global
    (``is_deepspeed_zero3_enabled``) or a mark that torch 2.13's ``fully_shard`` leaves on the modules it
    manages (torch/distributed/fsdp/_fully_shard/_fully_shard.py:289, read by
    transformers/distributed/fsdp.py:60): the caller, who knows whether parameters are sharded, says so.
    """
    state = PartialState()
    with state.split_between_processes(prompts) as own:
        mine = len(own)
    with state.split_between_processes(prompts, apply_padding=True) as share:
        completions = []
        for start in range(0, len(share), batch_size):
            batch = tokenizer(
                share[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left"
            ).to(state.device)
            ids = model.generate(**batch, generation_config=generation, synced_gpus=synced_gpus)
            reply = ids[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(reply, skip_special_tokens=True)
    return gather_object(completions[:mine])


class SampleGenerations(TrainerCallback):
    """Greedy completions of ``prompts`` that stop at the end of a turn, at each evaluation step
    (``eval_steps``) and at the last step, every rank generating (``complete_on_every_rank``); rank 0
    appends them to ``path`` and logs the table as TRL's ``LogCompletionsCallback`` does."""

    def __init__(self, trainer, prompts: list[str], path: Path, max_new_tokens: int):
        tokenizer = trainer.processing_class
        self.generation = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        self.trainer, self.prompts, self.path = trainer, list(prompts), path
        self.table: list[tuple[int, str, str]] = []
        self.last_step = -1  # on_step_end can run twice for a step (TRL's guard)

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
        step = state.global_step
        if step == self.last_step or (step % state.eval_steps and step < state.max_steps):
            return
        self.last_step = step
        completions = self.complete(args)
        if state.is_world_process_zero:
            rows = [(step, prompt, reply) for prompt, reply in zip(self.prompts, completions, strict=True)]
            self.table += rows
            with self.path.open("a") as file:
                file.writelines(json.dumps(dict(zip(COLUMNS, row, strict=True))) + "\n" for row in rows)
            log_table(self.table, args.report_to)

    def complete(self, args) -> list[str]:
        """``prompts``' completions by the model as it is now, in eval mode (no dropout). Under ZeRO-3 on
        the engine's module, whose hooks gather each module's parameters as it runs, as in training's
        forward (and keep no more live than ``stage3_max_live_parameters``, DeepSpeed 0.19.8's 1e9): TRL's
        default (``gather_deepspeed3_params=True``, trl/models/utils.py:141-150) would gather every
        parameter on every rank first, the whole model (~141 GB for 70B in bf16)."""
        accelerator = self.trainer.accelerator
        backend = DistributedBackend(accelerator)
        sharded = accelerator.num_processes > 1 and (backend.is_fsdp or backend.is_zero3)
        with unwrap_model_for_generation(
            self.trainer.model_wrapped, accelerator, gather_deepspeed3_params=False,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as model:  # fmt: skip
            training = model.training
            model.eval()
            try:
                return complete_on_every_rank(
                    model, self.prompts, self.trainer.processing_class, self.generation,
                    batch_size=args.per_device_eval_batch_size, synced_gpus=sharded,
                )  # fmt: skip
            finally:
                model.train(training)


def log_table(table: list[tuple[int, str, str]], report_to: list[str]) -> None:
    """Every row so far as one ``completions`` table, to wandb and Comet as TRL's ``LogCompletionsCallback``
    logs it (trl/trainer/callbacks.py:346-355)."""
    if "wandb" not in report_to and "comet_ml" not in report_to:
        return
    import pandas as pd

    frame = pd.DataFrame(columns=list(COLUMNS), data=table)
    if "wandb" in report_to:
        import wandb

        wandb.log({"completions": frame})
    if "comet_ml" in report_to:
        from trl.trainer.utils import log_table_to_comet_experiment

        log_table_to_comet_experiment(name="completions.csv", table=frame)


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
