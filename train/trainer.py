"""The TRL trainer for a run: SFTConfig from ``training.*`` (same names) plus what the device decides."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from train.checkpoints import CompleteCheckpoints, latest_checkpoint
from train.config import Config, LaunchConfig
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


# accelerate's distributed types that carry out each launch strategy.
_ENGINES = {
    "single": ("NO",),
    "ddp": ("MULTI_GPU", "MULTI_CPU"),
    "fsdp": ("FSDP",),
    "zero2": ("DEEPSPEED",),
    "zero3": ("DEEPSPEED",),
    "zero3_offload": ("DEEPSPEED",),
}


class LaunchCheck(TrainerCallback):
    """At the first step, makes sure the run is what its launch config asked for, and says so.

    Several launches exit 0 without doing what was asked (a multi-CPU config that starts one
    process, FSDP falling back to DDP on CPU), so the world size, the distributed engine and the
    wrapped model's class are checked, not assumed.
    """

    def __init__(self, trainer: Trainer, launch: LaunchConfig):
        self.trainer, self.launch = trainer, launch

    def on_train_begin(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        engine = accelerator.state.distributed_type.value
        expected = self.launch.num_processes * self.launch.num_machines
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        wrapped = type(self.trainer.model_wrapped).__name__
        report = (
            f"launch={self.launch.name}: {accelerator.num_processes} process(es), engine {engine}, "
            f"backend {backend}, model {wrapped}"
        )
        if accelerator.num_processes != expected or engine not in _ENGINES[self.launch.strategy]:
            raise RuntimeError(
                f"{report}; but launch={self.launch.name} asks for {expected} process(es) with "
                f"{' or '.join(_ENGINES[self.launch.strategy])}: start it with `python -m launch "
                f"launch={self.launch.name} launch.run=true ...` (or the accelerate line it prints)"
            )
        if accelerator.is_main_process:
            logging.getLogger("train").info("%s", report)


def build_trainer(config: Config, model, tokenizer, dataset: Dataset, run_dir: Path, dtype) -> SFTTrainer:
    """TRL's SFTTrainer on the encoded dataset; it folds ``assistant_masks`` into the labels itself."""
    if "wandb" in config.training.report_to:
        configure_wandb(config, run_dir)
    trainer = LlamaSFTTrainer(
        model=model,
        args=sft_config(config, run_dir, dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(config.method),
        callbacks=[MetricsJsonl(run_dir / METRICS_FILE)],
        compute_dtype=dtype,
        cpu_fused_lm_head=config.training.cpu_fused_lm_head,
    )
    trainer.add_callback(LaunchCheck(trainer, config.launch))
    trainer.add_callback(CompleteCheckpoints(trainer, run_dir))
    return trainer


def resume_checkpoint(config: Config, run_dir: Path) -> str | None:
    """``training.resume_from_checkpoint``: a directory, or ``latest`` for this run's newest complete one."""
    resume = config.training.resume_from_checkpoint
    if resume == "latest":
        latest = latest_checkpoint(run_dir / "checkpoints")
        return str(latest) if latest else None
    return resume
