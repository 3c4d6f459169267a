"""The TRL trainer for a run: SFTConfig from ``training.*`` (same names) plus what the device decides."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from train.config import Config
from train.model import build_peft_config
from train.outputs import METRICS_FILE, MetricsJsonl


def sft_config(config: Config, run_dir: Path, dtype: torch.dtype) -> SFTConfig:
    """``training.*`` mapped onto ``SFTConfig`` by name; precision and device follow ``dtype``."""
    training = dataclasses.asdict(config.training)
    for not_sft_config in ("resume_from_checkpoint", "cpu_fused_lm_head"):
        training.pop(not_sft_config)
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        run_name=run_dir.name,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU runs: accelerate must not pick a GPU backend, and DDP over gloo needs it (see launch/).
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.model.gradient_checkpointing,
        **training,
    )


def configure_wandb(config: Config, run_dir: Path) -> None:
    """wandb reads its settings from the environment; offline needs no account and no network."""
    os.environ["WANDB_MODE"] = config.wandb.mode
    os.environ["WANDB_PROJECT"] = config.wandb.project
    os.environ["WANDB_DIR"] = str(run_dir)
    if config.wandb.entity:
        os.environ["WANDB_ENTITY"] = config.wandb.entity


class LlamaSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, with the model's own cross-entropy on CPU.

    TRL scores the LM head with a chunked kernel that is a fused Triton kernel on GPU but a
    plain-torch fallback on CPU, about 3× slower there than the model's own loss with the
    128,256-token vocabulary (docs/benchmarks.md). On CPU the loss is therefore the
    model's own (same value, same ``num_items_in_batch`` normalisation, from transformers'
    ``Trainer``); the fused kernel's extra metrics (entropy, token accuracy) are GPU-only.
    """

    def __init__(self, *args, compute_dtype: torch.dtype, cpu_fused_lm_head: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_loss = self.args.use_cpu and not cpu_fused_lm_head
        if getattr(self.model, "is_loaded_in_4bit", False) and compute_dtype != torch.bfloat16:
            # TRL casts a quantized model's adapter to bf16; computing in fp32 (CPU) the adapter
            # follows the run's dtype, or every LoRA matmul runs in bf16, ~200x slower there.
            for parameter in self.model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(compute_dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model_loss:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build_trainer(config: Config, model, tokenizer, dataset: Dataset, run_dir: Path, dtype) -> SFTTrainer:
    """TRL's SFTTrainer on the encoded dataset; it folds ``assistant_masks`` into the labels itself."""
    if "wandb" in config.training.report_to:
        configure_wandb(config, run_dir)
    return LlamaSFTTrainer(
        model=model,
        args=sft_config(config, run_dir, dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(config.method),
        callbacks=[MetricsJsonl(run_dir / METRICS_FILE)],
        compute_dtype=dtype,
        cpu_fused_lm_head=config.training.cpu_fused_lm_head,
    )


def resume_checkpoint(config: Config, run_dir: Path) -> str | bool | None:
    """``training.resume_from_checkpoint``: a directory, or ``latest`` for this run's newest checkpoint."""
    resume = config.training.resume_from_checkpoint
    if resume == "latest":
        return True if any((run_dir / "checkpoints").glob("checkpoint-*")) else None
    return resume
