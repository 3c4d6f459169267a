"""Write a whole model as a transformers checkpoint one tensor at a time, however it is sharded.

``save_pretrained`` wants the whole state dict on one process first, and accelerate builds it so: FSDP's
``FULL_STATE_DICT`` and DeepSpeed's ``stage3_gather_16bit_weights_on_model_save`` put 141 GB of bf16 on
rank 0 for 70B, 811 GB for 405B. Here every rank walks the same plan, gathers one tensor at a time (the
collective its sharding needs), and the writing rank keeps it only until its safetensors file is full and
written; the other ranks drop it at once. Besides its own part of the model, no process holds more than
one shard file's tensors (``max_shard_size``, or a single tensor bigger than that) and the tensor being
gathered.

The shard plan is huggingface_hub's ``split_torch_state_dict_into_shards``, the one ``save_pretrained``
uses, made from the tensors' full shapes before anything is gathered, so file names and
``model.safetensors.index.json`` are the ones ``from_pretrained`` expects; tied weights are dropped as
``save_pretrained`` drops them (``lm_head.weight`` when tied to the embeddings).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from train.model.build import compute_dtype_of

log = logging.getLogger("train")

# huggingface_hub's default, and the size of the shards Meta's Llama 3.1 checkpoints are published in.
MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class SavedWeights:
    """What the writer wrote, and the most tensor bytes it held at once (on the writing rank)."""

    files: tuple[str, ...]
    total_size: int  # bytes of all tensors, as in the index's metadata
    largest_tensor: int  # bytes of the biggest single tensor
    largest_buffer: int  # bytes of gathered tensors held at once before a file was written


def save_full_model(
    model: PreTrainedModel,
    output_dir: str | Path,
    *,
    is_writer: bool,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> SavedWeights:
    """Write ``model``'s weights as safetensors shards (plus index), config.json and generation_config.json.

    ``model`` is the unwrapped transformers model: parameters may be FSDP2 ``DTensor`` shards, DeepSpeed
    ZeRO-3 partitions or whole tensors. Every rank must call this (the gathers are collectives); only
    ``is_writer`` writes. Floating-point tensors are written in ``dtype`` (None: as they are).
    """
    output_dir = Path(output_dir)
    state = model.state_dict(keep_vars=True)
    plan = shard_plan(model, state, dtype, max_shard_size)
    if is_writer:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_weights(output_dir)
    largest_buffer = 0
    for filename, names in plan.filename_to_tensors.items():
        shard, held = {}, 0
        for name in names:
            with whole(state[name]) as tensor:
                if is_writer:
                    # cast where it was gathered (a GPU), then move: the host sees the saved size only.
                    # ZeRO-3 frees the gathered weight when the block ends: keep a copy; a gathered DTensor is
                    # new memory already, and a whole tensor is the model's own, not a second copy.
                    copy = hasattr(state[name], "ds_id")
                    cast = tensor.detach().to(save_dtype(tensor, dtype))
                    shard[name] = cast.to("cpu", copy=copy).contiguous()
                    held += shard[name].nbytes
        largest_buffer = max(largest_buffer, held)
        if is_writer:
            save_file(shard, output_dir / filename, metadata={"format": "pt"})
        del shard
    if is_writer:
        if plan.is_sharded:
            index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
            (output_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        save_model_config(model, output_dir, dtype or _first_float_dtype(state))
    saved = SavedWeights(
        files=tuple(plan.filename_to_tensors),
        total_size=plan.metadata["total_size"],
        largest_tensor=max(_nbytes(full_shape(t), save_dtype(t, dtype)) for t in state.values()),
        largest_buffer=largest_buffer,
    )
    if is_writer:
        log.info(
            "saved %s: %d safetensors file(s), %d bytes; held at most %d bytes at once "
            "(max_shard_size %s, largest tensor %d bytes)",
            output_dir, len(saved.files), saved.total_size, saved.largest_buffer, max_shard_size,
            saved.largest_tensor,
        )  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the others return only once the checkpoint is complete on disk
    return saved


def save_adapter(model, output_dir: str | Path, *, is_writer: bool) -> None:
    """Write a peft model's adapters with peft's ``save_pretrained``, gathering only their tensors (LoRA's A
    and B, one at a time, every rank joins): never the frozen base, which FSDP's FULL_STATE_DICT would collect
    whole on rank 0 first (accelerate's get_state_dict) to keep 0.02% of it. Each trained tensor is its fp32
    master (``master``), under DeepSpeed too. The base's generation config goes beside them."""
    adapters, from_master = {}, 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or "lora_" in name:  # a frozen "ref" adapter (DPO) is saved too
            with master(parameter) as (tensor, is_master):
                from_master += is_master
                if is_writer:
                    adapters[name] = tensor.detach().to("cpu", copy=True)
    if is_writer:
        model.save_pretrained(output_dir, state_dict=adapters)
        # peft writes no generation_config.json; the base's says where generation stops (train.model.build);
        # a reward model generates nothing and has none
        generation = getattr(model.get_base_model(), "generation_config", None)
        if generation is not None:
            generation.save_pretrained(output_dir)
        if from_master:
            log.info(
                "saved %s: %d adapter tensors, %d of them DeepSpeed's fp32 master (safe_get_full_fp32_param)",
                output_dir, len(adapters), from_master,
            )  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def master(parameter: torch.Tensor):
    """``(tensor, is_master)``: the full trained value of ``parameter``, on every rank, for the block.

    Under DeepSpeed the module's parameter is the engine's copy in the compute dtype (bf16 on a GPU) and the
    fp32 master lives in the ZeRO optimizer's partition: ZeRO-1/2 ``single_partition_of_fp32_groups`` (a
    fragment per rank, ``param._hp_mapping``, all-reduced over the data-parallel group), ZeRO-3
    ``fp32_partitioned_groups_flat`` (``param._z3_optimizer.get_full_hp_param``, all-gathered). DeepSpeed's
    ``safe_get_full_fp32_param`` (deepspeed/utils/tensor_fragment.py, 0.19.8) assembles it; it is a
    collective, and every rank takes the same branch: the attributes mark the same parameters on all ranks.
    A parameter with no master (frozen: a DPO "ref" adapter; DeepSpeed returns None without communicating),
    and every parameter under the torch engines and FSDP2, whose trainable parameters are fp32 themselves,
    is ``whole``."""
    if hasattr(parameter, "_z3_optimizer") or hasattr(parameter, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        with torch.no_grad():
            fp32 = safe_get_full_fp32_param(parameter)
        if fp32 is not None:
            yield fp32, True
            return
    with whole(parameter) as tensor:
        yield tensor, False


def save_final(model, output_dir: str | Path, *, args, tokenizer, max_shard_size: int | str) -> None:
    """A run's final ``model/`` (full weights in the compute dtype, ``save_full_model``) or ``adapter/``
    (the fp32 masters under every launch, ``save_adapter``), with the tokenizer and training arguments
    ``Trainer._save`` writes beside them.
    ``model`` is unwrapped; every rank calls this, ``args.should_save`` writes."""
    from transformers.trainer import TRAINING_ARGS_NAME

    if isinstance(model, PreTrainedModel):
        dtype = compute_dtype_of(args)
        save_full_model(
            model, output_dir, is_writer=args.should_save, dtype=dtype, max_shard_size=max_shard_size
        )
    else:
        save_adapter(model, output_dir, is_writer=args.should_save)
    if args.should_save:
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(args, Path(output_dir) / TRAINING_ARGS_NAME)


def shard_plan(model: PreTrainedModel, state: dict, dtype: torch.dtype | None, max_shard_size: int | str):
    """Which tensor goes to which file, from full shapes only: every rank computes the same plan."""
    shapes = {
        name: torch.empty(full_shape(tensor), dtype=save_dtype(tensor, dtype), device="meta")
        for name, tensor in state.items()
    }
    shapes = remove_tied_weights_from_state_dict(shapes, model)  # meta tensors: tied by parameter identity
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    return split_torch_state_dict_into_shards(shapes, filename_pattern=pattern, max_shard_size=max_shard_size)


@contextmanager
def whole(tensor: torch.Tensor):
    """The full tensor behind ``tensor``, on every rank, for the duration of the block."""
    with torch.no_grad():
        if isinstance(tensor, DTensor):  # FSDP2: an all-gather every rank joins
            yield tensor.full_tensor()
        elif hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3: gathered read-only, partitioned again on exit
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                yield tensor.data
        else:
            yield tensor


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The unsharded shape: a DTensor's is its global one; a ZeRO-3 parameter keeps it in ``ds_shape``."""
    return getattr(tensor, "ds_shape", tensor.shape)


def save_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def save_model_config(model: PreTrainedModel, output_dir: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json, as ``save_pretrained`` writes them."""
    model.config.dtype = str(dtype).removeprefix("torch.")
    # FSDP2 renames the class (FSDPLlamaForCausalLM); save_pretrained strips the prefix the same way
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(output_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(output_dir)


def remove_stale_weights(output_dir: Path) -> None:
    """Weights of an earlier save here: a leftover model.safetensors would win over a new index."""
    for stale in [*output_dir.glob("model*.safetensors"), output_dir / SAFE_WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _first_float_dtype(state: dict) -> torch.dtype:
    return next(t.dtype for t in state.values() if t.is_floating_point())
