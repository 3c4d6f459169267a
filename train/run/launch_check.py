"""The check every run makes at its first step: it got the launch its config asked for, and says so."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

from train.config import LaunchConfig

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
    as_asked = words == _SHARDING[strategy]
    if model.zero_optimization_stage() == 3:  # each parameter's partition (ds_tensor) against its full size
        parameters = list(model.module.parameters())
        kinds = Counter(type(p).__name__ for p in parameters if hasattr(p, "ds_tensor"))
        held = sum(p.ds_tensor.numel() for p in parameters if hasattr(p, "ds_tensor"))
        share = held / sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
        words += f", {kinds.total()}/{len(parameters)} parameters partitioned"
        if kinds.keys() - {"Parameter"}:  # e.g. QLoRA's Params4bit, packed in the compute dtype
            words += " (" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
        words += f", rank {rank} holds {share:.0%}"
        as_asked = as_asked and kinds.total() == len(parameters)
    return words, as_asked


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
        if args.n_gpu > 1:  # transformers' nn.DataParallel: one process driving every visible GPU
            problem = (
                f"trains one process over {args.n_gpu} GPUs with nn.DataParallel ({args.n_gpu}x the batch): "
                "run one process per GPU with `python -m launch launch=ddp launch.run=true ...`, or "
                "CUDA_VISIBLE_DEVICES=0 for one GPU"
            )
        elif accelerator.num_processes != expected or engine not in _ENGINES[self.launch.strategy]:
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
