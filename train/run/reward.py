"""Reward models: TRL's RewardTrainer on our prepared pairs, with the run's callbacks (stage=rm).

``data.rows`` encodes each pair as ``chosen_ids`` and ``rejected_ids``, whole sequences (prompt and
completion, token-exact with our Llama 3.1 encoder, already cut to ``max_length``), which RewardTrainer
takes as they are (its ``_prepare_dataset`` tokenizes only rows without those columns). The model is the
decoder under a one-output ``score`` head (``train.model.build.build_model(reward=True)``); the loss is
Bradley-Terry's, -log sigmoid(r_chosen - r_rejected), and TRL logs accuracy (the share of pairs scored the
right way round) and margin (the mean r_chosen - r_rejected), for training and held-out pairs.

The result is a sequence classifier: ``model/`` (full) loads with ``AutoModelForSequenceClassification``;
``adapter/`` is peft's SEQ_CLS adapter, the trained ``score`` head saved beside the LoRA weights.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from train.config import Config
from train.model.build import build_peft_config
from train.run.trainer import ShardedOnCpu, keep_adapters_fp32, stage_trainer


class LlamaRewardTrainer(ShardedOnCpu, RewardTrainer):
    """TRL's RewardTrainer, with an fp32 master copy of a QLoRA adapter and its head (``keep_adapters_fp32``:
    TRL casts a quantized model's trainable weights to bf16 in ``__init__``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep_adapters_fp32(self.model)


def build_reward_trainer(
    config: Config,
    model,
    tokenizer,
    dataset: Dataset,
    run_dir: Path,
    args: RewardConfig,
    eval_dataset: Dataset | None = None,
) -> RewardTrainer:
    """TRL's RewardTrainer on prepared reward rows, with ``args`` from ``train.run.trainer.training_args``
    (``training.*`` as RewardConfig settings) and the callbacks every run has. Evaluation logs TRL's
    accuracy and margin with the eval loss."""
    return stage_trainer(
        LlamaRewardTrainer, config, run_dir, args, eval_dataset, model=model, train_dataset=dataset,
        processing_class=tokenizer, peft_config=build_peft_config(config.method, reward=True),
    )  # fmt: skip
