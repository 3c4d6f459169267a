"""What each rank holds once training runs: the bytes of its parameters, gradients, fp32 master weights and
optimizer states, by dtype, written once per run to ``<run_dir>/state_bytes/rank<k>.json``.

It is read right after the first optimizer step (gradients not yet zeroed, optimizer states created),
on every rank, from the tensors themselves: FSDP2's ``DTensor`` local shards, DeepSpeed's partitions
(ZeRO-3: each parameter's ``ds_tensor``, the gradient partition buffer, the fp32 partitions; ZeRO-1/2:
the fp32 partitions and the gradient partition), or plain tensors. The keys are the planner's per-GPU
state terms (train/plan/memory.py ``per_gpu_bytes``), and tests/test_state_bytes.py holds them against it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

STATE_BYTES_DIR = "state_bytes"


class StateBytes(TrainerCallback):
    """Writes ``state_bytes/rank<k>.json`` at the first optimizer step of a run; costs one walk over the
    parameters and optimizer states, once."""

    def __init__(self, run_dir: Path):
        self.directory = Path(run_dir) / STATE_BYTES_DIR
        self.written = False

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.written:
            return
        self.written = True
        self.directory.mkdir(parents=True, exist_ok=True)
        held = {"step": state.global_step + 1, "rank": args.process_index, **state_bytes(model, optimizer)}
        (self.directory / f"rank{args.process_index}.json").write_text(json.dumps(held, indent=1) + "\n")


def state_bytes(model: torch.nn.Module, optimizer) -> dict[str, dict[str, int]]:
    """``{"weights" | "gradients" | "master" | "optimizer": {dtype: bytes}}`` that this process holds.

    ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``, its DeepSpeed wrapper): the
    object with the states is found by unwrapping ``.optimizer``. Storage a master copy shares with the
    parameters (ZeRO-3 with fp32 parameters) is not counted twice.
    """
    held = {part: Counter() for part in ("weights", "gradients", "master", "optimizer")}
    zero = _unwrap(optimizer, lambda o: hasattr(o, "fp32_partitioned_groups_flat") or hasattr(
        o, "single_partition_of_fp32_groups"))  # fmt: skip
    parameters = list(model.parameters())
    if zero is not None and hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        weights = [p.ds_tensor for p in parameters]
        gradients = [zero.grad_partitions_flat_buffer]
        masters = zero.fp32_partitioned_groups_flat
    elif zero is not None:  # ZeRO-1/2
        weights = parameters
        gradients = [g for g in (getattr(zero, "grads_in_partition", None),) if g is not None]
        masters = zero.single_partition_of_fp32_groups
    else:
        weights, gradients, masters = parameters, [p.grad for p in parameters if p.grad is not None], []
    for tensor in weights:
        _add(held["weights"], tensor)
    for tensor in gradients:
        _add(held["gradients"], tensor)
    shared = {_storage(t) for t in weights}
    for tensor in masters:
        if _storage(tensor) not in shared:
            _add(held["master"], tensor)
    steps = _unwrap(optimizer, lambda o: isinstance(o, torch.optim.Optimizer) and o is not zero)
    for states in steps.state.values() if steps is not None else ():
        for value in states.values():
            if isinstance(value, torch.Tensor):
                _add(held["optimizer"], value)
    return {part: dict(sorted(counts.items())) for part, counts in held.items()}


def _unwrap(optimizer, wanted):
    """The first of ``optimizer``, ``optimizer.optimizer``, ... that is ``wanted``."""
    seen = 0
    while optimizer is not None and seen < 8:
        if wanted(optimizer):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _storage(tensor: torch.Tensor) -> int:
    return _local(tensor).untyped_storage().data_ptr()


def _add(counts: Counter, tensor: torch.Tensor) -> None:
    local = _local(tensor)
    counts[str(local.dtype).removeprefix("torch.")] += local.numel() * local.element_size()
