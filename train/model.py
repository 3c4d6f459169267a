"""Model building: the base model (random from architecture, or a local checkpoint) and the peft config.

The compute dtype is chosen here and only here: bfloat16 on a GPU, float32 on CPU,
where a bf16 matmul is ~200× slower (no native bf16 on AVX2).
"""

from __future__ import annotations

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


def build_model(model: ModelConfig, tokenizer, *, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """The base model: from ``model.path`` (safetensors only, no remote code) or random weights.

    Random weights depend only on ``seed``, so a tiny run's base model can be rebuilt
    exactly to load its adapter back.
    """
    if model.path is not None:
        return AutoModelForCausalLM.from_pretrained(
            model.path,
            dtype=dtype,
            attn_implementation=model.attn_implementation,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
        )
    config = llama_config(model, tokenizer)
    config._attn_implementation = model.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype)


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
