"""The TRL trainer for a run: SFTConfig from ``training.*`` (same names) plus what the device decides."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from train.checkpoints import CompleteCheckpoints, latest_checkpoint
from train.config import Config, LaunchConfig
from train.model import build_peft_config, launched_with_fsdp
from train.outputs import METRICS_FILE, MetricsJsonl


def sft_config(config: Config, run_dir: Path, dtype: torch.dtype) -> SFTConfig:
    """``training.*`` mapped onto ``SFTConfig`` by name; precision and device follow ``dtype``."""
    return trl_config(SFTConfig, config, run_dir, dtype)


def trl_config(trl_class: type, config: Config, run_dir: Path, dtype: torch.dtype, **settings):
    """``training.*`` and ``settings`` mapped by name onto ``trl_class``: ``SFTConfig``, or ``DPOConfig``/
    ``KTOConfig`` (which have no packing); precision and device follow ``dtype``."""
    training = dataclasses.asdict(config.training)
    for not_trl_config in ("resume_from_checkpoint", "cpu_fused_lm_head"):
        training.pop(not_trl_config)
    if trl_class is not SFTConfig:
        for sft_only in ("packing", "packing_strategy"):
            training.pop(sft_only)
    return trl_class(
        output_dir=str(run_dir / "checkpoints"),
        run_name=run_dir.name,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU runs: accelerate must not pick a GPU backend, and DDP over gloo needs it (see launch/).
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.model.gradient_checkpointing,
        **training,
        **settings,
    )


def configure_wandb(config: Config, run_dir: Path) -> None:
    """wandb reads its settings from the environment; offline needs no account and no network."""
    os.environ["WANDB_MODE"] = config.wandb.mode
    os.environ["WANDB_PROJECT"] = config.wandb.project
    os.environ["WANDB_DIR"] = str(run_dir)
    if config.wandb.entity:
        os.environ["WANDB_ENTITY"] = config.wandb.entity


class ShardedOnCpu(Trainer):
    """Mixed into every stage's trainer: FSDP shards on CPU too (``shard_with_fsdp_on_cpu``), and the
    final save gathers whole weights while checkpoints stay sharded."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = self.is_fsdp_enabled or shard_with_fsdp_on_cpu(self.accelerator, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_fsdp_enabled and not _internal_call:
            # checkpoints stay sharded; the final adapter/ or model/ gathers full weights, to load anywhere
            self.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        super().save_model(output_dir, _internal_call)


class LlamaSFTTrainer(ShardedOnCpu, SFTTrainer):
    """TRL's SFTTrainer, with the model's own cross-entropy on CPU.

    TRL scores the LM head with a chunked kernel that is a fused Triton kernel on GPU but a
    plain-torch fallback on CPU, about 3× slower there than the model's own loss with the
    128,256-token vocabulary (docs/benchmarks.md). On CPU the loss is therefore the
    model's own (same value, same ``num_items_in_batch`` normalisation, from transformers'
    ``Trainer``); the fused kernel's extra metrics (entropy, token accuracy) are GPU-only.

    Under FSDP it also shards on CPU (``shard_with_fsdp_on_cpu``), and its final save gathers
    whole weights while its checkpoints stay sharded.
    """

    def __init__(self, *args, compute_dtype: torch.dtype, cpu_fused_lm_head: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_loss = self.args.use_cpu and not cpu_fused_lm_head
        keep_adapter_in_compute_dtype(self.model, compute_dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model_loss:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def keep_adapter_in_compute_dtype(model, compute_dtype: torch.dtype) -> None:
    """Undo TRL's cast of a quantized model's adapter to bf16 when the run computes in fp32 (CPU), where
    every LoRA matmul would otherwise run in bf16, ~200x slower. TRL's trainers all cast it in __init__."""
    if getattr(model, "is_loaded_in_4bit", False) and compute_dtype != torch.bfloat16:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(compute_dtype)


def shard_with_fsdp_on_cpu(accelerator: Accelerator, args: SFTConfig) -> bool:
    """Make an FSDP launch on CPU real FSDP2, as accelerate makes it on a GPU; True when it did.

    accelerate sets ``DistributedType.FSDP`` only on accelerator devices: on CPU it builds
    ``MULTI_CPU`` and drops the FSDP plugin, so the run would train as DDP and say nothing
    (accelerate 1.15, state.py). torch's ``fully_shard`` and accelerate's FSDP2 path both run on
    gloo, so the state is all that is missing. On a GPU accelerate sets it itself: nothing to do.
    The plugin is the one ``accelerate launch`` wrote into ``FSDP_*`` (launch/accelerate/fsdp.yaml).
    """
    state = accelerator.state
    if (
        torch.cuda.is_available()
        or not launched_with_fsdp()
        or state.distributed_type != DistributedType.MULTI_CPU
    ):
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


# accelerate's distributed types that carry out each launch strategy.
_ENGINES = {
    "single": ("NO",),
    "ddp": ("MULTI_GPU", "MULTI_CPU"),
    "fsdp": ("FSDP",),
    "zero2": ("DEEPSPEED",),
    "zero3": ("DEEPSPEED",),
    "zero3_offload": ("DEEPSPEED",),
}


# What the wrapped model must show of each sharded strategy (DeepSpeed's own words for ZeRO).
_SHARDING = {
    "fsdp": "every parameter a DTensor shard",
    "zero2": "ZeRO-2, offload optimizer none, parameters none",
    "zero3": "ZeRO-3, offload optimizer none, parameters none",
    "zero3_offload": "ZeRO-3, offload optimizer cpu, parameters cpu",
}


def _sharding(strategy: str, model, rank: int) -> tuple[str, bool]:
    """How ``model`` is spread over the processes, in words, and whether that is what ``strategy`` asks."""
    if strategy == "fsdp":
        parameters = list(model.parameters())
        whole = Counter(type(p).__name__ for p in parameters if not isinstance(p, DTensor))
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
        share = held / sum(p.numel() for p in parameters)
        words = f"{len(parameters) - whole.total()}/{len(parameters)} parameters DTensor shards"
        if whole:  # e.g. QLoRA's Params4bit, which FSDP leaves whole unless bnb_4bit_quant_storage is a float
            words += " (whole: " + ", ".join(f"{n} {kind}" for kind, n in whole.items()) + ")"
        return f"{words}, rank {rank} holds {share:.0%}", not whole
    offload = (
        getattr(o, "device", "none") for o in (model.zero_offload_optimizer(), model.zero_offload_param())
    )
    words = "ZeRO-{}, offload optimizer {}, parameters {}".format(model.zero_optimization_stage(), *offload)
    return words, words == _SHARDING[strategy]


class LaunchCheck(TrainerCallback):
    """At the first step, makes sure the run is what its launch config asked for, and says so.

    Several launches exit 0 without doing what was asked (a multi-CPU config that starts one
    process, FSDP falling back to DDP on CPU), so the world size, the distributed engine, the
    wrapped model's class and how it is sharded (``_SHARDING``) are checked, not assumed.
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
        problem = None
        if accelerator.num_processes != expected or engine not in _ENGINES[self.launch.strategy]:
            problem = (
                f"asks for {expected} process(es) with {' or '.join(_ENGINES[self.launch.strategy])}: start "
                f"it with `python -m launch launch={self.launch.name} launch.run=true ...` (or the "
                "accelerate line it prints)"
            )
        elif self.launch.strategy in _SHARDING:
            sharding, as_asked = _sharding(
                self.launch.strategy, self.trainer.model_wrapped, accelerator.process_index
            )
            report += f", {sharding}"
            if not as_asked:
                problem = f"asks for {_SHARDING[self.launch.strategy]}: check {self.launch.accelerate_config}"
        if problem:
            raise RuntimeError(f"{report}; but launch={self.launch.name} {problem}")
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
    return watch_run(trainer, config, run_dir)


def watch_run(trainer: Trainer, config: Config, run_dir: Path) -> Trainer:
    """Attach what every stage's run needs besides its metrics: the launch check at step 0, and checkpoints
    marked COMPLETE with the stop file honoured (Slurm preemption, then resume)."""
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
