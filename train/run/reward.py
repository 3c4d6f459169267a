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
from train.run.outputs import METRICS_FILE, MetricsJsonl
from train.run.trainer import ShardedOnCpu, configure_wandb, evaluates_on, keep_adapters_fp32, watch_run


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
    (``training.*`` as RewardConfig settings) and the callbacks every run has."""
    if "wandb" in config.training.report_to:
        configure_wandb(config, run_dir)
    evaluates_on(eval_dataset, args)
    trainer = LlamaRewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,  # TRL's eval accuracy and margin, with the eval loss
        processing_class=tokenizer,
        peft_config=build_peft_config(config.method, reward=True),
        callbacks=[MetricsJsonl(run_dir / METRICS_FILE)],
    )
    return watch_run(trainer, config, run_dir)
