"""The architecture as the planner counts it: parameters per layer and in all, the decoder Linears, LoRA's
adapters, the units FSDP gathers, NF4 storage and the KV cache, from ``conf/model/`` alone.

8,030,261,248 (8B), 70,553,706,496 (70B), 405,853,388,800 (405B): exactly Meta's checkpoints.
"""

from __future__ import annotations

import math

from train.config import MethodConfig, ModelConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bitsandbytes' quantize_4bit: absmax per 64 weights; double quant stores it in 8 bits with an fp32
# absmax per 256 of those blocks (bitsandbytes/functional.py, quantize_4bit defaults).
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256


def linear_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear in one decoder layer; GQA makes k/v only kv_heads*head_dim wide."""
    hidden, inter = model.hidden_size, model.intermediate_size
    head_dim = hidden // model.num_attention_heads
    q, kv = model.num_attention_heads * head_dim, model.num_key_value_heads * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }  # fmt: skip


def layer_parameters(model: ModelConfig) -> int:
    """One decoder layer: its seven Linears (no biases) and two RMSNorm weights."""
    return sum(i * o for i, o in linear_shapes(model).values()) + 2 * model.hidden_size


def count_parameters(model: ModelConfig) -> int:
    """Embeddings + layers + final norm + LM head (absent when tied): 8,030,261,248 for 8B."""
    embedding = model.vocab_size * model.hidden_size
    lm_head = 0 if model.tie_word_embeddings else embedding
    return embedding + model.num_hidden_layers * layer_parameters(model) + model.hidden_size + lm_head


def decoder_linear_parameters(model: ModelConfig) -> int:
    """The decoder Linears of all layers: what bitsandbytes quantizes and autocast casts."""
    return model.num_hidden_layers * sum(i * o for i, o in linear_shapes(model).values())


def largest_unit(model: ModelConfig) -> int:
    """Parameters of the largest unit FSDP gathers whole: a decoder layer, or the tail (LM head + final
    norm; the embeddings, a unit of their own, are smaller), which accelerate 1.15 shards as units of
    their own (utils/fsdp_utils.py, fsdp2_prepare_model; tied embeddings join the tail)."""
    return max(layer_parameters(model), model.vocab_size * model.hidden_size + model.hidden_size)


def nf4_bytes(elements: int) -> int:
    """One bitsandbytes NF4 tensor with double quantization: 4-bit codes, 8-bit absmax, fp32 second level."""
    return elements // 2 + nf4_statistics(elements)


def nf4_statistics(elements: int) -> int:
    """The quantization statistics of one NF4 tensor with double quantization: an 8-bit absmax per block of
    64, an fp32 second-level absmax per 256 blocks."""
    blocks = math.ceil(elements / NF4_BLOCK)
    return blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)


def nf4_statistics_bytes(model: ModelConfig) -> int:
    """The quantization statistics of every decoder Linear: bitsandbytes needs a weight's statistics whole,
    so FSDP and ZeRO-3 shard the 4-bit codes and leave every rank all of these (``Linear4bit.quant_state``).
    1/64 byte per parameter and a little: 6.2 GB for 405B."""
    return model.num_hidden_layers * sum(nf4_statistics(i * o) for i, o in linear_shapes(model).values())


def largest_linear(model: ModelConfig) -> int:
    """Elements of the largest decoder Linear."""
    return max(i * o for i, o in linear_shapes(model).values())


def largest_tensor(model: ModelConfig) -> int:
    """Elements of the largest single weight: the embedding (and LM head), or the largest decoder Linear."""
    return max(model.vocab_size * model.hidden_size, largest_linear(model))


def weight_bytes(model: ModelConfig) -> dict[str, int]:
    """All weights at 2 / 1 / 0.5 bytes each, and as bitsandbytes loads QLoRA (``nf4_bnb``).

    bitsandbytes quantizes only the decoder Linears: the embedding is not a Linear and
    transformers keeps the LM head out of quantization, so both stay bf16, as do the norms.
    """
    params = count_parameters(model)
    return {
        "bf16": 2 * params,
        "fp8": params,
        "int4": params // 2,
        "nf4_bnb": nf4_linear_bytes(model) + 2 * unquantized_parameters(model),
    }


def nf4_linear_bytes(model: ModelConfig) -> int:
    return model.num_hidden_layers * sum(nf4_bytes(i * o) for i, o in linear_shapes(model).values())


def unquantized_parameters(model: ModelConfig) -> int:
    return count_parameters(model) - decoder_linear_parameters(model)


def lora_parameters(model: ModelConfig, method: MethodConfig) -> int:
    """LoRA's A (r x in) and B (out x r) per targeted Linear per layer; ``all-linear`` is every Linear
    of the layers (peft leaves the LM head out)."""
    shapes = linear_shapes(model)
    return model.num_hidden_layers * sum(method.r * sum(shapes[t]) for t in lora_targets(method))


def lora_targets(method: MethodConfig) -> tuple[str, ...]:
    targets = LINEARS if method.target_modules == "all-linear" else tuple(method.target_modules)
    unknown = [t for t in targets if t not in LINEARS]
    if unknown:
        raise ValueError(f"method.target_modules: {unknown} are not Llama Linears; use names from {LINEARS}")
    return targets


def kv_cache_bytes_per_token(model: ModelConfig) -> int:
    """K and V, per layer, kv_heads x head_dim wide, in bf16: 131,072 bytes for 8B."""
    head_dim = model.hidden_size // model.num_attention_heads
    return 2 * model.num_hidden_layers * model.num_key_value_heads * head_dim * 2


def largest_trainable_tensor(model: ModelConfig, method: MethodConfig) -> int:
    shapes = linear_shapes(model)
    if method.name == "full":
        return max(model.vocab_size * model.hidden_size, *(i * o for i, o in shapes.values()))
    return max(method.r * max(shapes[t]) for t in lora_targets(method))
