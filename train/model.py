"""Model building: the base model (random from architecture, or a local checkpoint) and the peft config.

The compute dtype is chosen here and only here: bfloat16 on a GPU, float32 on CPU,
where a bf16 matmul is ~200× slower (no native bf16 on AVX2).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from train.config import MethodConfig, ModelConfig


def compute_dtype(requested: str) -> torch.dtype:
    """The dtype a run computes in: ``auto`` is bfloat16 on a bf16-capable GPU, else float32."""
    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attention_implementation(requested: str) -> str:
    """``auto``: FlashAttention-2 on a GPU when flash-attn is installed, else PyTorch's sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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
    model: ModelConfig, tokenizer, *, dtype: torch.dtype, seed: int, method: MethodConfig | None = None
) -> PreTrainedModel:
    """The base model: from ``model.path`` (safetensors only, no remote code) or random weights.

    Random weights depend only on ``seed``, so a tiny run's base model can be rebuilt
    exactly to load its adapter back. With ``method.load_in_4bit`` (QLoRA) the weights load
    through bitsandbytes as 4-bit NF4 with ``dtype`` compute, prepared for k-bit training;
    random weights take the same path, saved once to a temporary checkpoint first.
    """
    if method is not None and method.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        quantized = load_4bit(model, tokenizer, dtype=dtype, seed=seed, method=method)
        return prepare_model_for_kbit_training(
            quantized, use_gradient_checkpointing=model.gradient_checkpointing
        )
    if model.path is not None:
        return AutoModelForCausalLM.from_pretrained(
            model.path,
            dtype=dtype,
            **_LOAD_SAFELY,
            attn_implementation=attention_implementation(model.attn_implementation),
        )
    config = llama_config(model, tokenizer)
    config._attn_implementation = attention_implementation(model.attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype)


# Weights come from a local directory, as safetensors, and never run code shipped with them.
_LOAD_SAFELY = {"use_safetensors": True, "local_files_only": True, "trust_remote_code": False}


def launched_with_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def load_4bit(model: ModelConfig, tokenizer, *, dtype: torch.dtype, seed: int, method: MethodConfig):
    """The base model as bitsandbytes 4-bit weights (``method``'s quant type, double quantization)."""
    from transformers import BitsAndBytesConfig

    settings = {}
    if launched_with_fsdp():
        # FSDP shards float tensors only: 4-bit weights packed into the compute dtype shard like the rest
        settings["bnb_4bit_quant_storage"] = dtype
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=method.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,  # bf16 on GPU; fp32 on CPU, where bf16 compute is ~80x slower
        **settings,
    )
    with tempfile.TemporaryDirectory(prefix="random-weights-") as scratch:
        path = model.path
        if path is None:
            build_model(model, tokenizer, dtype=dtype, seed=seed).save_pretrained(scratch)
            path = scratch
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map=device_map, **_LOAD_SAFELY,
            attn_implementation=attention_implementation(model.attn_implementation),
        )  # fmt: skip


def build_peft_config(method: MethodConfig) -> LoraConfig | None:
    """The LoRA adapter for ``lora``/``qlora`` (TRL's SFTTrainer applies it); None for ``full``."""
    if method.name == "full":
        return None
    return LoraConfig(
        r=method.r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=method.target_modules,
        task_type="CAUSAL_LM",
    )
