"""Placement before weights: every process knows its rank, its device and its launch engine before any
weight loads, so a big checkpoint is read once per node and each rank's weights land on its own GPU.

transformers and accelerate do this implicitly, but only once the trainer has built its arguments, and a
model loaded before that misses all of it (transformers 5.25, accelerate 1.15, read from their sources):

- the process group: ``TrainingArguments`` creates accelerate's ``PartialState`` (``_setup_devices``),
  which calls ``init_process_group`` and, on a GPU, ``torch.cuda.set_device(LOCAL_RANK)``;
- FSDP's rank-0 loading: ``from_pretrained`` reads real weights only on local rank 0 when a process group
  exists, ``ACCELERATE_USE_FSDP`` and ``FSDP_CPU_RAM_EFFICIENT_LOADING`` are set
  (``transformers.distributed.fsdp.is_fsdp_enabled``); the other ranks hold empty tensors until
  accelerate's FSDP2 prepare broadcasts rank 0's (``fsdp_utils.fsdp2_load_full_state_dict``);
- DeepSpeed ZeRO-3's ``zero.Init``: ``from_pretrained`` partitions each weight as it is read only while an
  ``HfDeepSpeedConfig`` is alive; ``TrainingArguments`` registers one
  (``DeepSpeedPlugin.set_deepspeed_weakref``) when ``accelerate launch`` set ``ACCELERATE_USE_DEEPSPEED``.

So the run builds its TRL arguments first and calls ``place_processes`` with them: one step, here, that
makes all three true before ``train.model.build`` loads anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

from train.config import ConfigError, LaunchConfig
from train.run.launch_env import launched_with_deepspeed, launched_with_fsdp, started_by_launcher

log = logging.getLogger("train")


@dataclass(frozen=True)
class Placement:
    """Where this process sits: its ranks, its device, and how its launch spreads the model."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    engine: str  # accelerate's distributed type as started: NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED
    loads_on_rank_zero: bool  # FSDP: only local rank 0 reads the checkpoint, the others get its broadcast
    zero3_init: bool  # DeepSpeed ZeRO-3: each weight is partitioned as it is read

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def device_map(self) -> dict[str, torch.device]:
        """``from_pretrained``'s device_map for weights that must be placed while loading (bitsandbytes'
        4-bit quantizes on the device it loads to): this process's own GPU, never GPU 0 for every rank. A
        ``torch.device``, not an index: transformers' kernel mapping reads the device type from it
        (``integrations/hub_kernels.py:512``, ``get_device_type``), which an int does not have."""
        return {"": self.device}

    @property
    def shards_4bit(self) -> bool:
        """QLoRA's 4-bit weights are sharded by the engine (FSDP, ZeRO-3): then no rank quantizes the whole
        model; rank 0 quantizes one tensor at a time into each rank's shard
        (train/model/quantized_loading.py)."""
        sharded = self.engine == "FSDP" or self.zero3_init
        return sharded and torch.distributed.is_available() and torch.distributed.is_initialized()

    def main_process_first(self):
        """A context: each node's main process runs the block first, the others after it (accelerate's
        barrier), e.g. data preparation that they then read from its cache."""
        return PartialState().local_main_process_first()

    def describe(self) -> str:
        loading = (
            "checkpoint read by local rank 0, broadcast to the others (FSDP)"
            if self.loads_on_rank_zero
            else "weights partitioned while read (DeepSpeed ZeRO-3 zero.Init)"
            if self.zero3_init
            else "every process reads the checkpoint"
        )
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}) on {self.device}, "
            f"engine {self.engine}; {loading}"
        )


def place_processes(launch: LaunchConfig, args: TrainingArguments) -> Placement:
    """Create accelerate's state for this process (process group, device) exactly as the trainer will, and
    say where weights go. Raises ConfigError, before any weight loads, for a launch that would silently train
    something else than asked (several GPUs under ``launch=local``: transformers' ``nn.DataParallel``)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and not started_by_launcher():
        raise ConfigError(
            f"launch={launch.name}: {gpus} GPUs are visible to one process, which transformers would "
            f"train as nn.DataParallel ({gpus}x the configured batch, one GPU's memory for the model). Run "
            f"one process per GPU: `python -m launch launch=ddp launch.num_processes={gpus} launch.run=true "
            "...` (or launch=fsdp / zero3 for models one GPU cannot hold), or use one GPU: "
            "`CUDA_VISIBLE_DEVICES=0 python -m train ...`"
        )
    device = args.device  # TrainingArguments._setup_devices: PartialState, init_process_group, set_device
    state = PartialState()
    engine = launch_engine(state.distributed_type)
    placement = Placement(
        rank=state.process_index,
        local_rank=state.local_process_index,
        world_size=state.num_processes,
        device=device,
        engine=engine.value,
        loads_on_rank_zero=is_fsdp_enabled(),  # what from_pretrained asks: rank 0 reads, the rest wait
        zero3_init=is_deepspeed_zero3_enabled(),
    )
    if placement.is_main:
        log.info("placement: %s", placement.describe())
    return placement


def launch_engine(backend: DistributedType, environ=os.environ) -> DistributedType:
    """The engine the trainer's Accelerator will run, known before it exists. ``PartialState`` knows only the
    backend (MULTI_GPU on CUDA, MULTI_CPU here); the Accelerator makes it FSDP or DEEPSPEED later, from
    the variables ``accelerate launch`` set (accelerate 1.15, state.py:974 and :1010-1013). Placement
    decides now how the weights load: FSDP's rank-0 reading, QLoRA's sharded loading, the storage dtype.
    On CPU the trainer makes FSDP real FSDP2 (``shard_with_fsdp_on_cpu``)."""
    if launched_with_fsdp(environ) and backend in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return DistributedType.FSDP
    if launched_with_deepspeed(environ):
        return DistributedType.DEEPSPEED
    return backend


def shard_with_fsdp_on_cpu(accelerator: Accelerator, args: TrainingArguments) -> bool:
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


def release_freed_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``). Loading allocates and frees whole
    tensors (zero.Init's construction and gathers, FSDP's broadcast buffers, the checkpoint's pages) in
    pieces below glibc's mmap threshold, which its heap otherwise keeps: measured here, about 1 GiB per
    rank after loading a 1.8 GiB checkpoint (bench/load_memory.py), times every process of a node. No-op
    where the C library is not glibc."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's ``malloc_trim``: the heap's freed pages back to the OS (``release_freed_host_memory``
    without its garbage collection, cheap enough to call after every tensor loaded)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


class ReleaseLoadingMemory(TrainerCallback):
    """At step 0, once the model is loaded, sharded and broadcast: ``release_freed_host_memory``."""

    def on_train_begin(self, args, state, control, **kwargs):
        release_freed_host_memory()
