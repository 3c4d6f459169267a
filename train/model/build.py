"""Model building: the base model (random from architecture, or a local checkpoint) and the peft config.

The compute dtype is chosen here and only here: bfloat16 on a GPU, float32 on CPU,
where a bf16 matmul is ~200× slower (no native bf16 on AVX2).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
)
from transformers.modeling_utils import remove_tied_weights_from_state_dict, set_zero3_state

from data.tokenizer import stop_token_ids
from train.config import MethodConfig, ModelConfig, lora_settings
from train.model.fast_path import attention
from train.model.placement import Placement, release_freed_host_memory
from train.model.quantized_loading import (
    QUANTIZED_LOAD,
    REWARD_HEAD,
    checkpoint_files,
    partition_for_zero3,
    quantized_skeleton,
)

log = logging.getLogger("train")


def compute_dtype(requested: str) -> torch.dtype:
    """The dtype a run computes in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32."""
    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def compute_dtype_of(args) -> torch.dtype:
    """The dtype a run's TRL arguments compute in: their bf16/fp16 flags, set from ``compute_dtype``."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def attention_implementation(requested: str) -> str:
    """``auto``: FlashAttention-2 on a GPU when flash-attn is installed, else PyTorch's sdpa
    (``train.model.fast_path.attention``, for this machine)."""
    return attention(requested, torch.cuda.is_available())


def llama_config(model: ModelConfig, tokenizer) -> LlamaConfig:
    """A transformers ``LlamaConfig`` with the architecture from ``conf/model/<size>.yaml``."""
    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.rms_norm_eps,
        rope_parameters={"rope_theta": model.rope_theta, **vars(model.rope_scaling)},
        tie_word_embeddings=model.tie_word_embeddings,
        initializer_range=model.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    model: ModelConfig,
    tokenizer,
    *,
    dtype: torch.dtype,
    seed: int,
    method: MethodConfig | None = None,
    placement: Placement | None = None,
    reward: bool = False,
) -> PreTrainedModel:
    """The base model: from ``model.path`` (safetensors only, no remote code) or random weights.

    Random weights depend only on ``seed``, so a tiny run's base model can be rebuilt
    exactly to load its adapter back. With ``method.load_in_4bit`` (QLoRA) the weights load
    through bitsandbytes as 4-bit NF4 with ``dtype`` compute onto this process's device
    (``placement``), frozen as loaded (``prepare_4bit_for_training``); random weights take the
    same path, saved once to a temporary checkpoint first. Weights are stored in ``weights_dtype``.
    Call it after ``train.model.placement.place_processes``: that is what makes FSDP read the checkpoint on
    one rank per node and ZeRO-3 partition it while reading.

    ``reward``: a reward model (stage=rm), the same decoder under a ``score`` head of one output in place of
    the LM head (transformers' ``LlamaForSequenceClassification``, what TRL's RewardTrainer trains): the head
    is new, drawn from ``seed``, and the checkpoint's LM head is not read.
    """
    if method is not None and method.load_in_4bit:
        quantized = load_4bit(
            model, tokenizer, dtype=dtype, seed=seed, method=method, placement=placement, reward=reward
        )
        return prepare_4bit_for_training(quantized, model.gradient_checkpointing)
    dtype = weights_dtype(method, dtype, placement)
    attn_implementation = attention_implementation(model.attn_implementation)
    if model.path is not None:
        with seeded(seed):  # a reward model's new head
            loaded = load_checkpoint(model.path, dtype, attn_implementation, reward=reward)
        return finished(loaded, tokenizer)
    config = llama_config(model, tokenizer)
    config._attn_implementation = attn_implementation
    if reward:
        return finished(new_reward_model(config, seed).to(dtype), tokenizer)
    with seeded(seed):
        return finished(LlamaForCausalLM(config).to(dtype), tokenizer)


def new_reward_model(config: LlamaConfig, seed: int) -> LlamaForSequenceClassification:
    """A reward model of ``config``'s architecture (one output), its weights drawn from ``seed``: whole on
    every rank, as the causal LM is built here. Its decoder comes from ``AutoModel.from_config``, which under
    ZeRO-3 would partition it at once (zero.Init) before ``post_init`` initializes it whole (an IndexError
    on the embedding's padding row); ``set_zero3_state`` keeps zero.Init out."""
    config.num_labels = 1
    with seeded(seed), set_zero3_state():
        return LlamaForSequenceClassification(config)


@contextlib.contextmanager
def seeded(seed: int):
    """Random draws from ``seed`` inside, the caller's random state untouched outside."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def finished(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """A language model that stops as the Instruct models do (``stop_at_end_of_turn``); a reward model that
    finds the last token of each sequence: transformers' sequence classifier scores the token before the
    first ``pad_token_id`` (``<|finetune_right_pad_id|>``, never inside a Llama 3.1 chat)."""
    if isinstance(model, LlamaForSequenceClassification):
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
    return stop_at_end_of_turn(model, tokenizer)


def prepare_4bit_for_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """A 4-bit base ready for adapters: frozen, every weight as loaded (the compute dtype or NF4).

    Not peft's ``prepare_model_for_kbit_training``: it upcasts every parameter that is not 4-bit to fp32,
    and for 8B the embeddings and the LM head (2 x 525M parameters) then take 4.2 GB where bf16 holds them
    in 2.1 GB, and the residual stream becomes fp32. Nothing frozen needs fp32 to train in bf16: Meta ships
    these weights in bf16, and its reference RMSNorm multiplies a bf16 weight as transformers' does (the
    variance is fp32 either way). Keeping even the norms in fp32 would make the final norm's output fp32,
    which the bf16 LM head refuses outside autocast (generation at each eval): measured. The adapters are
    fp32 (``train.run.trainer.keep_adapters_fp32``). With gradient checkpointing the embeddings' output must
    require grad, or a reentrant checkpoint of a frozen first layer has nothing to differentiate (what peft
    does too); the trainer turns the checkpointing on."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def stop_at_end_of_turn(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """``model`` generating as Meta's Instruct models do: it stops at ``<|end_of_text|>``, ``<|eom_id|>`` or
    ``<|eot_id|>`` (``data.tokenizer.STOP_TOKENS``), whatever generation_config.json its checkpoint had (a
    base one stops at ``<|end_of_text|>`` only). Every model a run saves or exports carries it from here.

    config.json says the same, as Meta's Instruct one does: at train start Trainer aligns both with the
    tokenizer's EOS (transformers' ``align_special_tokens``) and puts that id first where the config lacks
    it."""
    model.config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    return model


def weights_dtype(
    method: MethodConfig | None, compute: torch.dtype, placement: Placement | None
) -> torch.dtype:
    """The dtype the weights are stored in (docs/memory.md, "Precision policy"): trainable weights always
    have an fp32 master copy, so full fine-tuning under a torch engine (one process, DDP) loads fp32 and
    computes in ``compute`` under autocast (the trainer's ``bf16=True``). FSDP2 and DeepSpeed keep that
    master copy themselves (accelerate upcasts trainable shards to fp32, DeepSpeed's optimizer holds an
    fp32 partition), so they load in ``compute``; so do LoRA's frozen base weights."""
    full = method is not None and method.name == "full"
    engine = placement.engine if placement is not None else "NO"
    if full and engine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return torch.float32
    return compute


def load_checkpoint(
    path: str, dtype: torch.dtype, attn_implementation: str, reward: bool = False
) -> PreTrainedModel:
    """A local safetensors checkpoint, read the way this process's placement says (once per node under
    FSDP and ZeRO-3: call it after ``place_processes``), then the heap that reading freed given back.
    ``reward``: as a reward model (``build_model``), its ``score`` head new unless the checkpoint has one."""
    loaded = model_class(reward).from_pretrained(
        path, dtype=dtype, **load_safely(), attn_implementation=attn_implementation, **reward_head(reward)
    )
    release_freed_host_memory()  # transient tensors, zero.Init's gathers
    return loaded


def model_class(reward: bool):
    """The auto class a checkpoint loads as: a causal LM, or a sequence classifier for a reward model."""
    return AutoModelForSequenceClassification if reward else AutoModelForCausalLM


def reward_head(reward: bool) -> dict:
    """``from_pretrained``'s arguments for a reward model's head: one output, the reward."""
    return {"num_labels": 1} if reward else {}


def hub_kernels_asked() -> bool:
    """Whether the user asked for transformers' Hub kernels (``USE_HUB_KERNELS=1``). transformers 5 turns them
    on by default in ``from_pretrained`` (modeling_utils.py:4422, ``USE_HUB_KERNELS`` defaults to YES) and on
    CUDA swaps RMSNorm and RoPE for ``kernels-community`` layers downloaded from the Hub, again at each
    ``model.train()`` (:5096): unpinned code from the network, and a failed load or first step on a node
    without Hub access. Off unless asked; the fast path's kernels are Liger's (train/model/fast_path.py)."""
    return os.environ.get("USE_HUB_KERNELS", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def load_safely() -> dict:
    """``from_pretrained``'s arguments for every model the project loads: weights from a local directory, as
    safetensors, never code shipped with them or fetched from the Hub (``hub_kernels_asked``)."""
    return {
        "use_safetensors": True,
        "local_files_only": True,
        "trust_remote_code": False,
        "use_kernels": hub_kernels_asked(),
    }


def load_4bit(
    model: ModelConfig,
    tokenizer,
    *,
    dtype: torch.dtype,
    seed: int,
    method: MethodConfig,
    placement: Placement | None = None,
    reward: bool = False,
):
    """The base model (a reward model with ``reward``) as bitsandbytes 4-bit weights (``method``'s quant
    type, double quantization), quantized on this process's device (``placement``; CPU without one).

    Under FSDP and ZeRO-3 (``placement.shards_4bit``) no rank quantizes the whole model: this returns the
    quantized model's skeleton, and at step 0, once the engine has sharded it, rank 0 reads and quantizes
    one tensor at a time and each rank keeps its shard (train/model/quantized_loading.py)."""
    from transformers import BitsAndBytesConfig

    settings = {}
    if placement is not None and placement.engine in ("FSDP", "DEEPSPEED"):
        # FSDP and ZeRO-3 shard float tensors only: 4-bit weights packed in the compute dtype shard too
        settings["bnb_4bit_quant_storage"] = dtype
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=method.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,  # bf16 on GPU; fp32 on CPU, where bf16 compute is ~80x slower
        **settings,
    )
    attn_implementation = attention_implementation(model.attn_implementation)
    if placement is not None and placement.shards_4bit:
        path, remove = write_random_checkpoint(model, tokenizer, dtype=dtype, seed=seed, placement=placement)
        head = functools.partial(write_reward_head, checkpoint=path, seed=seed) if reward else None
        skeleton = quantized_skeleton(path, quantization, dtype, attn_implementation, reward_head=head)
        getattr(skeleton, QUANTIZED_LOAD).remove_after = remove  # once rank 0 has read it, at step 0
        engine = placement.engine
        if placement.zero3_init:
            engine = f"ZeRO-3 ({partition_for_zero3(skeleton, placement.device)} parameters partitioned now)"
        if placement.is_main:
            log.info(
                "QLoRA under %s: the quantized model's skeleton now; its weights at step 0, read and "
                "quantized by rank 0 one tensor at a time, each rank keeping its shard", engine,
            )  # fmt: skip
        return finished(skeleton, tokenizer)
    device_map = {"": torch.device("cpu")} if placement is None else placement.device_map
    with (
        random_checkpoint(model, tokenizer, dtype=dtype, seed=seed, placement=placement) as path,
        seeded(seed),
    ):
        quantized = model_class(reward).from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map=device_map, **load_safely(),
            attn_implementation=attn_implementation, **reward_head(reward),
        )  # fmt: skip
        if reward:  # the head the sharded skeleton writes too, so that every launch starts alike
            with torch.no_grad():
                write_reward_head(quantized.score.weight, checkpoint=path, seed=seed)
    return finished(quantized, tokenizer)


def write_reward_head(weight: torch.Tensor, *, checkpoint: str, seed: int) -> None:
    """A 4-bit reward model's ``score`` head into ``weight``: the checkpoint's, where it has one (a reward
    model's), or a new one drawn from ``seed`` as transformers initializes a linear (normal, std
    ``initializer_range``), the same on every rank and launch."""
    files = checkpoint_files(Path(checkpoint))
    if REWARD_HEAD in files:
        with safe_open(str(files[REWARD_HEAD]), framework="pt") as reader:
            value = reader.get_tensor(REWARD_HEAD)
    else:
        std = AutoConfig.from_pretrained(checkpoint, local_files_only=True).initializer_range
        value = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * std
    weight.copy_(value.to(weight.dtype))


@contextlib.contextmanager
def random_checkpoint(
    model: ModelConfig, tokenizer, *, dtype: torch.dtype, seed: int, placement: Placement | None
):
    """``model.path``, or for random weights a checkpoint of them that ``from_pretrained`` can quantize,
    removed once every rank loaded it (``write_random_checkpoint``)."""
    path, remove = write_random_checkpoint(model, tokenizer, dtype=dtype, seed=seed, placement=placement)
    try:
        yield path
    finally:
        if remove is not None:
            remove()


def write_random_checkpoint(
    model: ModelConfig, tokenizer, *, dtype: torch.dtype, seed: int, placement: Placement | None
) -> tuple[str, Callable[[], None] | None]:
    """``model.path`` and None, or for random weights a checkpoint of them, written once per node by its main
    process into a directory of its own under the temporary directory, and the function that removes it
    once every rank has read it (a barrier first, then each node's main process deletes its copy).

    Not ``save_pretrained``: once a process group exists it writes on global rank 0 only
    (transformers' ``should_save_on_this_rank``), and every node needs the files.
    """
    if model.path is not None:
        return model.path, None
    distributed = torch.distributed.is_initialized()
    name = [f"random-weights-{uuid.uuid4().hex}"]
    if distributed:
        torch.distributed.broadcast_object_list(name, src=0)  # one name for every node
    # one directory per node, named by the node's first global rank: where nodes share a temporary
    # directory (TMPDIR on a shared filesystem, or the local test cluster's nodes on one machine) each still
    # writes and removes its own
    node = 0 if placement is None else placement.rank - placement.local_rank
    path = Path(tempfile.gettempdir()) / f"{name[0]}-node{node}"
    local_main = placement is None or placement.is_local_main
    if local_main:
        path.mkdir()
        weights = build_model(model, tokenizer, dtype=dtype, seed=seed)
        weights.config.save_pretrained(path)
        # tied weights once, under the name save_pretrained keeps (the embedding), as Meta's 3.2 files do
        state = remove_tied_weights_from_state_dict(weights.state_dict(), weights)
        save_file({name: t.contiguous() for name, t in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        del weights
    if distributed:
        torch.distributed.barrier()

    def remove() -> None:
        if distributed:
            torch.distributed.barrier()
        if local_main:
            shutil.rmtree(path, ignore_errors=True)

    return str(path), remove


def build_peft_config(method: MethodConfig, reward: bool = False) -> LoraConfig | None:
    """The LoRA adapter for ``lora``/``qlora`` (TRL's SFTTrainer applies it); None for ``full``. Every
    ``LoraConfig`` field ``method`` sets, typed or passed through (``train.config.lora_settings``: DoRA,
    rsLoRA, ``init_lora_weights``, ``modules_to_save``, ...), under its own name; ``validate`` has refused
    what peft or the launch cannot run before anything loads. A reward model's adapter is peft's SEQ_CLS:
    its new ``score`` head trains whole beside the adapter (peft adds it to ``modules_to_save``) and is
    saved with it."""
    if method.name == "full":
        return None
    return LoraConfig(**lora_settings(method), task_type="SEQ_CLS" if reward else "CAUSAL_LM")
