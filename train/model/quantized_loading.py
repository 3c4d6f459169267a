"""QLoRA under FSDP and ZeRO-3: the checkpoint is read and quantized once, by rank 0, one tensor at a time,
and every rank keeps its shard of it and nothing more.

This stands in for what transformers and accelerate do for every other model but leave out for quantized
ones (transformers 5.25, accelerate 1.15, read from their sources):

- FSDP: ``from_pretrained`` reads real weights on local rank 0 only, and accelerate's FSDP2 prepare sends
  each rank its shard, unless the model is quantized (``modeling_utils.py:4930`` ``... and not
  is_quantized``; ``accelerate/utils/fsdp_utils.py:789-830``, ``model_has_params4bit``): every rank then
  quantizes the whole model before ``fully_shard`` cuts it;
- ZeRO-3: ``from_pretrained`` builds the model under ``zero.Init`` and partitions each weight as it is read,
  unless the model is quantized (``modeling_utils.py:1435`` and ``:4576``): every rank then holds the whole
  quantized model until ``deepspeed.initialize`` partitions it.

Two steps, around the engine's own sharding, which stays the engine's:

1. ``quantized_skeleton``, where ``from_pretrained`` would load: the model transformers' bitsandbytes
   quantizer builds (``Linear4bit`` for the linears, the quantizer's attributes), each weight an unwritten
   host tensor of its final shape: address space the OS backs only when a page is written. FSDP2's
   ``fully_shard`` copies each rank's part out of it (on a GPU through one unit's transient copy on the
   device), so no rank ever writes more than its shard. Under ZeRO-3 ``partition_for_zero3`` hands it to
   DeepSpeed's ``zero.Init`` at once, one tensor at a time: left to ``deepspeed.initialize``, a model not
   built under ``zero.Init`` is first moved whole to every GPU (``engine.py:2093-2094``) and broadcast.
2. ``LoadQuantizedShards``, at step 0, once the engine has sharded: rank 0 reads one tensor from the
   checkpoint and quantizes it exactly as ``from_pretrained`` does (transformers' ``Bnb4bitQuantize``), and
   every rank keeps its shard of it: FSDP's local DTensor shard from rank 0's broadcast, ZeRO-3's partition
   through DeepSpeed's ``GatheredParameters(modifier_rank=0)``. The quantization statistics (absmax and
   codes: a byte per 64 weights with double quantization, 1/32 of the 4-bit codes) are every rank's,
   as bitsandbytes needs them whole.

Drop this module when transformers loads a quantized model under FSDP and ZeRO-3 as it loads the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, BitsAndBytesConfig, GenerationConfig, PreTrainedModel, TrainerCallback
from transformers.modeling_utils import set_zero3_state
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from train.model.placement import trim_heap

log = logging.getLogger("train")


class CheckpointKeyError(ValueError):
    """The checkpoint lacks a weight the model needs."""


@dataclass
class ShardedQuantizedLoad:
    """What step 0 fills: each weight's module, attribute and checkpoint key, and how the 4-bit ones are
    quantized (the ``Params4bit`` attributes ``Linear4bit`` gave them; None for the weights kept as they are).
    """

    checkpoint: Path
    dtype: torch.dtype
    files: dict[str, Path]  # checkpoint key -> its safetensors file (``checkpoint_files``)
    weights: list[tuple[torch.nn.Module, str, str, dict | None]] = field(default_factory=list)
    done: bool = False
    remove_after: Callable[[], None] | None = None  # a random-weight checkpoint written for this run


def checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """Checkpoint key -> its safetensors file (one file, or a sharded checkpoint's index)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: checkpoint / name for key, name in weight_map.items()}
    single = checkpoint / "model.safetensors"
    with safe_open(str(single), framework="pt") as reader:
        return dict.fromkeys(reader.keys(), single)


QUANTIZED_LOAD = "sharded_quantized_load"  # the model's attribute that carries its ShardedQuantizedLoad
REWARD_HEAD = "score.weight"  # a reward model's one-output head (transformers' sequence classifier)


def quantized_skeleton(
    path: str,
    quantization: BitsAndBytesConfig,
    dtype: torch.dtype,
    attn_implementation: str,
    reward_head: Callable[[torch.Tensor], None] | None = None,
) -> PreTrainedModel:
    """The model ``from_pretrained(path, quantization_config=quantization)`` returns, but holding no weight
    yet: every parameter an unwritten host tensor of its final shape and dtype (4-bit ones packed as
    bitsandbytes packs them). Its ``ShardedQuantizedLoad`` is the model's ``QUANTIZED_LOAD`` attribute.
    Raises CheckpointKeyError, before anything is read, when the checkpoint lacks a weight.

    ``reward_head``: a reward model (a sequence classifier of one output) whose ``score`` head, one row of
    ``hidden_size`` floats, is written now on every rank by ``reward_head`` (a head the checkpoint has, or a
    new one drawn from the seed): peft's SEQ_CLS adapter copies it into its trainable ``modules_to_save`` when
    the trainer wraps the model, before step 0, so it cannot wait for step 0 as the frozen weights do."""
    from bitsandbytes.nn import Params4bit
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    config._attn_implementation = attn_implementation
    config.name_or_path = path
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    if reward_head is not None:
        config.num_labels, mapping = 1, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    # as from_pretrained builds it: weights on meta; zero.Init kept out (a sequence classifier builds its
    # decoder through AutoModel.from_config, which would partition it under ZeRO-3): partition_for_zero3
    with init_empty_weights(include_buffers=False), set_zero3_state():
        model = mapping[type(config)](config)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None)
    plan = ShardedQuantizedLoad(checkpoint=Path(path), dtype=dtype, files=checkpoint_files(Path(path)))
    storage = quantization.bnb_4bit_quant_storage
    if config.tie_word_embeddings:
        model.tie_weights()  # one parameter under two names from here on (transformers ties at load)
    names: dict[int, list[str]] = {}  # a tied weight has several (the embedding and the LM head)
    for key, meta in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(meta), []).append(key)
    seen: set[int] = set()
    for module in model.modules():
        for name, meta in list(module.named_parameters(recurse=False)):
            if id(meta) in seen:  # a tied weight: loaded once, through its first owner
                continue
            seen.add(id(meta))
            # saved under whichever of its names the checkpoint kept: save_pretrained keeps the embedding's,
            # safetensors' save_model may keep the LM head's
            key = next((k for k in names[id(meta)] if k in plan.files), names[id(meta)][0])
            if reward_head is not None and key == REWARD_HEAD:  # kept whole by every rank, written now
                head = torch.nn.Parameter(torch.empty(meta.shape, dtype=dtype), requires_grad=False)
                reward_head(head.data)
                setattr(module, name, head)
                continue
            if isinstance(meta, Params4bit):
                # bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel at the first eval forward and
                # marks the shared quant_state so (nn/modules.py:613-620); the engine's next gather brings
                # the original packing back under that mark, and evaluation reads garbage. CPU only.
                module.support_avx512bf16_for_cpu = False
                recipe = dict(meta.__dict__)  # blocksize, quant_type, compress_statistics, storage, module
                packed = ((meta.numel() + 1) // (storage.itemsize * 2), 1)  # bitsandbytes' quantize_4bit
                unwritten = Params4bit(
                    torch.empty(packed, dtype=storage), False, **{**recipe, "bnb_quantized": True}
                )
                plan.weights.append((module, name, key, {**recipe, "shape": tuple(meta.shape)}))
            else:
                unwritten = torch.nn.Parameter(torch.empty(meta.shape, dtype=dtype), requires_grad=False)
                plan.weights.append((module, name, key, None))
            setattr(module, name, unwritten)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [key for _, _, key, _ in plan.weights if key not in plan.files]
    if missing:
        raise CheckpointKeyError(
            f"{path}: the checkpoint has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} of the {len(plan.weights)} weights a {type(model).__name__} needs): is "
            "model.path a Llama checkpoint saved by transformers (safetensors with its config.json)?"
        )
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.eval()
    setattr(model, QUANTIZED_LOAD, plan)
    return model


def partition_for_zero3(model: PreTrainedModel, device: torch.device) -> int:
    """The skeleton partitioned by DeepSpeed's ``zero.Init`` now, one parameter at a time (moved to
    ``device``, broadcast from rank 0, cut: deepspeed partition_parameters.py:1200-1215), as
    ``from_pretrained`` partitions an unquantized model while it loads; returns how many parameters it
    partitioned. ``deepspeed.initialize`` then finds a zero.Init model (every parameter has ``ds_id``) and
    neither moves the whole model to the GPU nor broadcasts it (engine.py:2077-2094, 2194). Buffers (the
    rotary frequencies) are the module's own: moved here, as zero.Init's construction context would have."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())
    for buffer in model.buffers():
        buffer.data = buffer.data.to(device)
    return sum(hasattr(parameter, "ds_id") for parameter in model.parameters())


def load_quantized_shards(plan: ShardedQuantizedLoad, device: torch.device) -> None:
    """Every weight of ``plan`` into this rank's shard, one tensor at a time; all ranks call it together,
    after the engine has sharded the model (FSDP2 DTensors, or ZeRO-3 partitions)."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit
    from torch.distributed.tensor import DTensor

    rank = torch.distributed.get_rank()
    readers: dict[Path, object] = {}
    for module, name, key, recipe in plan.weights:
        value, statistics = None, [None]
        if rank == 0:
            file = plan.files[key]
            if file not in readers:
                readers[file] = safe_open(str(file), framework="pt", device="cpu")
            value = readers[file].get_tensor(key).to(plan.dtype)
            if recipe is not None:  # as transformers' Bnb4bitQuantize: Params4bit(value, **meta).to()
                arguments = {k: v for k, v in recipe.items() if k not in ("shape", "bnb_quantized")}
                quantized = Params4bit(value, requires_grad=False, **arguments).to(device)
                value = quantized.data
                statistics = [{k: v.cpu() if torch.is_tensor(v) else v
                               for k, v in quantized.quant_state.as_dict(packed=True).items()}]  # fmt: skip
                del quantized  # with the tensor it was quantized from, on the device
        if recipe is not None:
            torch.distributed.broadcast_object_list(statistics, src=0)
            quant_state = QuantState.from_dict(statistics[0], device=device)
            module.quant_state = quant_state  # what Linear4bit's forward falls back on for a sharded weight
        parameter = getattr(module, name)
        _keep_shard(parameter, value, rank)
        if recipe is not None and not isinstance(parameter, DTensor):
            parameter.quant_state = quant_state  # ZeRO-3 keeps the Params4bit; FSDP2's shard is a new tensor
        del value
        if rank == 0:
            trim_heap()  # the tensors read: glibc would keep the heap they grew (0.5 GiB over 32 layers here)
    readers.clear()
    plan.done = True
    if plan.remove_after is not None:
        torch.distributed.barrier()  # every rank is past the last read
        plan.remove_after()


def _keep_shard(parameter: torch.nn.Parameter, value: torch.Tensor | None, rank: int) -> None:
    """This rank's shard of ``value`` (rank 0's; None elsewhere) into ``parameter``, as its engine shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(parameter, DTensor):  # FSDP2: every rank cuts its shard from rank 0's broadcast
            device = parameter.device_mesh.device_type  # NCCL sends from and to the GPU
            full = value.to(device) if rank == 0 else torch.empty(parameter.shape, dtype=parameter.dtype,
                                                                  device=device)  # fmt: skip
            torch.distributed.broadcast(full, src=0)
            local = parameter.to_local()
            shard = distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None)
            local.copy_(shard.to_local().to(local.device))
        elif hasattr(parameter, "ds_id"):  # ZeRO-3: gathered, written on rank 0, partitioned from rank 0
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                if rank == 0:  # straight from the host to the gathered parameter on the GPU
                    parameter.data.copy_(value.view_as(parameter.data))
        else:
            raise RuntimeError(
                f"a {type(parameter).__name__} the engine did not shard: the QLoRA skeleton must be sharded "
                "by FSDP or ZeRO-3 before its weights load (train/model/quantized_loading.py)"
            )


class LoadQuantizedShards(TrainerCallback):
    """At step 0, the first thing once the engine has sharded: ``load_quantized_shards``. Before any forward,
    evaluation or check of the launch; a resumed run's checkpoint, read before it, holds the same frozen
    values."""

    def __init__(self, plan: ShardedQuantizedLoad, device: torch.device):
        self.plan, self.device = plan, device

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.plan.done:
            load_quantized_shards(self.plan, self.device)
            if state.is_world_process_zero:
                log.info(
                    "QLoRA weights: %s read and quantized by rank 0, one tensor at a time; each rank keeps "
                    "its shard (%d tensors)",
                    self.plan.checkpoint,
                    len(self.plan.weights),
                )
