"""Online RL: TRL's GRPOTrainer on prompts (``data.prompts``) with the reward functions the config names
(stage=grpo, ``stage.rewards``), and the run's callbacks.

Each step TRL samples ``stage.num_generations`` completions of each prompt with transformers' ``generate``
(every rank its share; ``synced_gpus`` under FSDP/ZeRO-3, which TRL sets from the engine), scores each with
every reward function, weighs them (``stage.rewards[*].weight``: GRPOConfig's ``reward_weights``), and
pushes the policy toward the completions above their group's mean reward, with a KL term (``stage.beta``)
to the starting model: LoRA/QLoRA score it with the adapter disabled (TRL's own path, no copy); full
fine-tuning keeps a frozen copy, made here as DPO's is (``train.run.preference.reference_copy``), since TRL
would reload it from ``model.config._name_or_path``, which a model built from the architecture does not
have. Rewards, their spread within groups, completion lengths and the KL go to ``metrics.jsonl`` under TRL's
names (``reward``, ``rewards/<function>/mean``, ``completions/mean_length``, ``kl``); a few completions with
their rewards go to ``samples.jsonl`` at each logging step.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer

from train.config import Config, import_target
from train.model.build import build_peft_config
from train.model.placement import Placement
from train.run.preference import reference_copy
from train.run.samples import SAMPLES_FILE
from train.run.trainer import ShardedOnCpu, keep_adapters_fp32, stage_trainer


class LlamaGRPOTrainer(ShardedOnCpu, GRPOTrainer):
    """TRL's GRPOTrainer with full fine-tuning's reference made from the policy, an fp32 master copy of
    a QLoRA adapter, and completions with their rewards written to ``samples.jsonl``."""

    def __init__(self, *args, reference=None, **kwargs):
        with _reference(reference):
            super().__init__(*args, **kwargs)
        keep_adapters_fp32(self.model)


@contextlib.contextmanager
def _reference(reference):
    """While GRPOTrainer is built: its reference model is ``reference`` instead of one loaded from the
    policy's ``_name_or_path`` (grpo_trainer.py: ``create_model_from_path``, called only for the
    reference)."""
    if reference is None:
        yield
        return
    create = grpo_trainer.create_model_from_path
    grpo_trainer.create_model_from_path = lambda *args, **kwargs: reference
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = create


def reward_functions(config: Config) -> tuple[list, list[float]]:
    """The functions ``stage.rewards`` names, their settings bound, and their weights (validated by
    ``train.config``). A class (``RewardModel``) is built once, with its settings."""
    functions, weights = [], []
    for reward in config.stage.rewards:
        settings = {key: value for key, value in dict(reward).items() if key not in ("_target_", "weight")}
        target = import_target(reward["_target_"])
        if isinstance(target, type):
            function = target(**settings)
        elif settings:  # TRL logs each function under its __name__: the partial keeps the function's
            function = functools.update_wrapper(functools.partial(target, **settings), target)
        else:
            function = target
        functions.append(function)
        weights.append(float(reward.get("weight", 1.0)))
    return functions, weights


class CompletionSamples(TrainerCallback):
    """``samples.jsonl``: at each training log, the latest generation batch (TRL keeps it, gathered from
    every rank, in ``_logs``): each prompt's last message, the completion and each reward function's score,
    on the main process."""

    def __init__(self, trainer: GRPOTrainer, path: Path):
        self.trainer, self.path = trainer, path

    def on_log(self, args, state, control, logs=None, **kwargs):
        kept = self.trainer._logs
        if not state.is_world_process_zero or not logs or "loss" not in logs or not kept["completion"]:
            return
        rewards = {name: list(values) for name, values in kept["rewards"].items()}
        with self.path.open("a") as file:
            for index, (prompt, completion) in enumerate(
                zip(kept["prompt"], kept["completion"], strict=True)
            ):
                row = {
                    "step": state.global_step,
                    "prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                    "completion": completion[-1]["content"] if isinstance(completion, list) else completion,
                    "rewards": {name: values[index] for name, values in rewards.items()},
                }
                file.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_grpo_trainer(
    config: Config,
    model,
    tokenizer,
    dataset: Dataset,
    run_dir: Path,
    args: GRPOConfig,
    placement: Placement | None = None,
    eval_dataset: Dataset | None = None,
) -> GRPOTrainer:
    """TRL's GRPOTrainer on ``dataset``'s prompts with the config's reward functions; ``args`` from
    ``train.run.trainer.training_args`` (``stage.*`` as GRPOConfig settings)."""
    functions, weights = reward_functions(config)
    args.reward_weights = weights
    reference = None
    if config.method.name == "full" and config.stage.beta:
        reference = reference_copy(model, args, placement)
    trainer = stage_trainer(
        LlamaGRPOTrainer, config, run_dir, args, eval_dataset, model=model, reward_funcs=functions,
        train_dataset=dataset, processing_class=tokenizer, peft_config=build_peft_config(config.method),
        reference=reference,
    )  # fmt: skip
    trainer.add_callback(CompletionSamples(trainer, run_dir / SAMPLES_FILE))
    return trainer
