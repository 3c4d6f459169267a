"""The planner's arithmetic in bytes: per trainable parameter under the precision policy, activations,
the LM head's loss, and what one GPU (or CPU process) and one node's host RAM hold under a launch strategy.

Everything is derived from the architecture in ``conf/model/`` and the run's settings, following what
this project's stack does (transformers, peft, TRL, bitsandbytes, accelerate's FSDP2, torch/DeepSpeed
optimizers); docs/memory.md states each formula with its source. Sizes are bytes. ``model.dtype`` must be
resolved for the device first (``Device.resolve``): ``auto`` is bf16 on a GPU, fp32 on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from train.config import STRATEGIES, Config, MethodConfig, ModelConfig
from train.plan.architecture import (
    count_parameters,
    decoder_linear_parameters,
    kv_cache_bytes_per_token,
    largest_linear,
    largest_tensor,
    largest_trainable_tensor,
    largest_unit,
    layer_parameters,
    linear_shapes,
    lora_parameters,
    lora_targets,
    nf4_linear_bytes,
    nf4_statistics_bytes,
    unquantized_parameters,
)

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SHARDED = ("fsdp", "zero3", "zero3_offload")  # weights, gradients and optimizer states split over all GPUs
DEEPSPEED = ("zero2", "zero3", "zero3_offload")
TORCH_ENGINES = ("single", "ddp", "fsdp")  # torch's optimizer on the model's own (fp32) parameters
KV_TABLE_TOKENS = (1024, 16_384, 131_072)  # the launch post's 1k / 16k / 128k columns, in binary k
# TRL's fused LM head scores the vocabulary in [4096 tokens x 32768 vocab] tiles and never holds the
# full logits (trl 1.16: kernels/chunked_logprob.TOKEN_CHUNK_SIZE, trainer/utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32_768
# ZeRO-3 steps its optimizer one sub-group of at most this many elements at a time
# (deepspeed 0.19 runtime/zero/config.py, sub_group_size default; accelerate's config leaves it).
DEEPSPEED_SUB_GROUP = 10**9
# The final save of a full fine-tune writes one safetensors file of at most this size at a time.
SAVE_SHARD_BYTES = 5 * 10**9


# ── what an adapter method trains: LoRA's A and B, DoRA's magnitudes, modules_to_save ─────────
def uses_dora(method: MethodConfig) -> bool:
    """``method.use_dora`` (a peft LoraConfig field passed through, train/config.py)."""
    return method.name != "full" and bool(getattr(method, "use_dora", False))


def dora_magnitude_parameters(model: ModelConfig, method: MethodConfig) -> int:
    """DoRA's magnitude vectors: one trainable value per output feature of each adapted Linear, the row
    norms of W + scale x BA when peft wraps the model (peft 0.21 tuners/lora/dora.py:101-128
    ``DoraLinearLayer.update_layer``, :86-91 ``get_weight_norm``: ``torch.linalg.norm(weight, dim=1)``, an
    ``nn.Parameter``). 8B, q/k/v/o: 32 x (4096 + 1024 + 1024 + 4096) = 327,680."""
    if not uses_dora(method):
        return 0
    shapes = linear_shapes(model)
    return model.num_hidden_layers * sum(shapes[target][1] for target in lora_targets(method))


def llama_modules(model: ModelConfig) -> dict[str, int]:
    """Every module with weights, by its path in transformers' ``LlamaForCausalLM``, and its parameters."""
    hidden, vocab = model.hidden_size, model.vocab_size
    modules = {"model.embed_tokens": vocab * hidden, "model.norm": hidden, "lm_head": vocab * hidden}
    for layer in range(model.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        modules |= {f"{prefix}.input_layernorm": hidden, f"{prefix}.post_attention_layernorm": hidden}
        for name, (fan_in, fan_out) in linear_shapes(model).items():
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            modules[f"{prefix}.{block}.{name}"] = fan_in * fan_out
    return modules


def saved_module_sizes(model: ModelConfig, method: MethodConfig) -> list[int]:
    """The modules ``method.modules_to_save`` trains whole, as peft's copies: a name takes every module whose
    path ends with it (peft 0.21 utils/other.py ``_set_trainable``: ``key.endswith(target_key)``), so
    ``norm`` is every RMSNorm. Their originals stay frozen beside them."""
    names = tuple(getattr(method, "modules_to_save", None) or ()) if method.name != "full" else ()
    return [size for path, size in llama_modules(model).items() if names and path.endswith(names)]


def adapter_parameters(model: ModelConfig, method: MethodConfig) -> int:
    """What LoRA/QLoRA train: A and B (``lora_parameters``), DoRA's magnitudes, modules_to_save's copies."""
    return (
        lora_parameters(model, method)
        + dora_magnitude_parameters(model, method)
        + sum(saved_module_sizes(model, method))
    )


def trained_parameters(model: ModelConfig, method: MethodConfig) -> int:
    """Every parameter the optimizer steps: all of them (full), or the adapter's (``adapter_parameters``)."""
    return count_parameters(model) if method.name == "full" else adapter_parameters(model, method)


def largest_trained_tensor(model: ModelConfig, method: MethodConfig) -> int:
    """Elements of the largest tensor the optimizer steps (a module of modules_to_save may be the LM head)."""
    return max(largest_trainable_tensor(model, method), *saved_module_sizes(model, method), 0)


def compute_bytes(model: ModelConfig) -> int:
    """Bytes of ``model.dtype``, the dtype the run computes in; ``auto`` must be resolved for a device."""
    if model.dtype not in DTYPE_BYTES:
        raise ValueError(
            f"model.dtype={model.dtype!r}: resolve it for the device first (train.plan.Device.resolve: "
            "bf16 on a GPU, fp32 on a CPU)"
        )
    return DTYPE_BYTES[model.dtype]


# ── bytes per trainable parameter: the precision policy ───────────────────────────────
@dataclass(frozen=True)
class TrainableBytes:
    """Bytes per trainable parameter under the precision policy (docs/memory.md, "Precision policy")."""

    weight: int  # the parameter as the engine holds it
    grad: int  # its gradient (DeepSpeed: the gradient partition it accumulates into)
    master: int  # an fp32 copy of the weight beside ``weight`` (DeepSpeed only)
    optimizer: int  # the moments
    step_temp: int  # what exists only during the optimizer step


def trainable_bytes(method: MethodConfig, strategy: str, optim: str, compute: int, *, on_gpu: bool = True):
    """What each trainable parameter costs on this engine, computing in ``compute`` bytes.

    torch engines (single, ddp, fsdp): every trainable parameter is fp32, full weights and adapters
    alike, so it is its own master copy: 4 weight + 4 gradient + moments in fp32 (torch's AdamW keeps
    them in the parameter's dtype); bf16 compute comes from autocast (single, ddp) or FSDP2's
    MixedPrecisionPolicy. DeepSpeed: its parameters in the compute dtype, a gradient partition in the
    same dtype (``grad_accum_dtype`` defaults to the model's), an fp32 master copy, fp32 moments. ZeRO-3
    means to share fp32 parameters as their own master copy, but compares a ``torch.device`` with the
    accelerator's device name, a string, never equal (deepspeed 0.19.8 stage3.py
    ``_create_fp32_partitions``): it always copies (measured on CPU, tests/test_state_bytes.py).
    Step temporaries: on a GPU ``adamw_torch`` is torch's foreach implementation, one parameter-sized
    fp32 temporary (``per_gpu_bytes`` counts the per-tensor loop it runs on a CPU); DeepSpeed's step adds
    the fp32 gradient partition it makes and runs the same torch optimizer on its flat fp32 partition
    (one tensor: two temporaries on a CPU); offloaded, DeepSpeedCPUAdam steps in place.
    """
    states = 0 if optim.startswith("sgd") else 1 if "lion" in optim else 2  # Adam family (and unknown): 2
    moment = 1 if "8bit" in optim else 4
    loop = states > 0 and "8bit" not in optim and "fused" not in optim  # torch's foreach or per-tensor step
    if strategy == "zero3_offload":  # in host RAM, stepped in place by DeepSpeedCPUAdam
        return TrainableBytes(compute, compute, 4, states * moment, 4)
    if strategy in DEEPSPEED:
        return TrainableBytes(compute, compute, 4, states * moment, 4 + (4 if on_gpu else 8) * loop)
    return TrainableBytes(4, 4, 0, states * moment, 4 if loop and on_gpu else 0)


def fp32_residual(method: MethodConfig, strategy: str) -> bool:
    """Whether embeddings and norms are fp32 as the forward sees them, so the residual stream is fp32: full
    fine-tuning under single/ddp (fp32 weights under autocast: embedding lookups and norm products are not
    autocast ops). QLoRA's frozen embeddings and norms stay in the compute dtype
    (``train.model.build.prepare_4bit_for_training``), and so does its residual stream."""
    return method.name == "full" and strategy in ("single", "ddp")


def autocast_copy_bytes(model: ModelConfig, method: MethodConfig, strategy: str) -> int:
    """bf16 copies that autocast makes of fp32 trainable Linear weights (single/ddp with bf16 compute):
    cached for the whole forward and saved for the backward (torch autocast's weight cache)."""
    if strategy not in ("single", "ddp") or compute_bytes(model) == 4:
        return 0
    linears = decoder_linear_parameters(model) if method.name == "full" else lora_parameters(model, method)
    return compute_bytes(model) * linears


@dataclass(frozen=True)
class Kernels:
    """What the fast path (train/model/fast_path.py) changes in what a step keeps, as the planner counts
    it."""

    liger: bool = False  # Liger's RMSNorm and SwiGLU kernels
    offload: bool = False  # TRL's activation offloading
    packed_mask: bool = False  # packed rows under sdpa: a block-diagonal mask of seq² per row


PLAIN = Kernels()  # no fast path: what a CPU run computes with

# trl 1.16 models/activation_offloading.py: OffloadActivations' max_fwd_stash_size, the tensors kept on the
# GPU as the forward moves on (and brought back ahead of the backward)
OFFLOAD_STASH = 5


def activation_bytes(
    model: ModelConfig,
    method: MethodConfig,
    tokens: int,
    checkpointing: bool,
    strategy: str = "single",
    kernels: Kernels = PLAIN,
) -> int:
    """What the backward pass keeps for ``tokens`` (batch x seq) tokens, sdpa/flash attention (no s² term).

    Per layer and token: both RMSNorms keep their input in fp32 (transformers upcasts), 4H each, and
    their output (2H in bf16; 4H when the residual stream is fp32, ``fp32_residual``); q, k, v after RoPE
    (H + 2 kv), the attention output and o_proj's copy of it (2H), gate, up, silu(gate), their product
    (4I), in the compute dtype; LoRA adds, per targeted input element, the matmul's copy of its input and
    the dropout's mask or output (2 x compute; 1 x without dropout), and r outputs per token.
    With checkpointing, each layer keeps only its input and one layer is recomputed at a time.
    Frozen Linears keep less (no input for a weight gradient): LoRA measures ~30% under this count.
    Liger's RMSNorm keeps its input as it is and one fp32 reciprocal RMS per token instead of an fp32
    copy; its SwiGLU keeps gate and up and recomputes silu (liger_kernel/ops/rms_norm.py, swiglu.py).
    With activation offloading the forward's kept tensors go to host RAM (``offloaded_activation_bytes``)
    and the GPU holds what one layer's backward needs, plus the offloader's stash of tensors in flight.
    DoRA keeps two outputs per token of each adapted Linear, and with dropout a weight per adapted Linear
    (``dora_kept_weight_bytes``): every layer's, or the recomputed layer's under checkpointing.
    """
    compute = compute_bytes(model)
    residual = 4 if fp32_residual(method, strategy) else compute
    hidden = model.hidden_size
    per_token = _layer_bytes_per_token(model, method, strategy, kernels)
    layers = model.num_hidden_layers
    final_norm = 4 * hidden + residual * hidden
    weights = dora_kept_weight_bytes(model, method)  # per layer, whatever the tokens
    if kernels.offload:  # the stash: the forward's kept tensors, layer inputs under checkpointing
        stashed = residual * hidden if checkpointing else compute * model.intermediate_size
        return tokens * (per_token + final_norm + OFFLOAD_STASH * stashed) + weights
    kept = (layers * residual * hidden + per_token) if checkpointing else layers * per_token
    return tokens * (kept + final_norm) + (weights if checkpointing else layers * weights)


def _layer_bytes_per_token(model: ModelConfig, method: MethodConfig, strategy: str, kernels: Kernels) -> int:
    """What one decoder layer keeps per token for its backward (``activation_bytes``)."""
    compute = compute_bytes(model)
    residual = 4 if fp32_residual(method, strategy) else compute
    hidden, intermediate = model.hidden_size, model.intermediate_size
    kv = model.num_key_value_heads * hidden // model.num_attention_heads
    norms = 2 * (residual * hidden + 4 + residual * hidden) if kernels.liger else 2 * (4 + residual) * hidden
    mlp = (3 if kernels.liger else 4) * intermediate  # gate, up, (silu(gate),) their product
    per_token = norms + compute * (3 * hidden + 2 * kv + mlp)
    if method.name != "full":
        shapes = linear_shapes(model)
        per_input = 2 * compute if method.lora_dropout else compute
        per_token += sum(per_input * shapes[t][0] + compute * method.r for t in lora_targets(method))
        # DoRA (peft 0.21 tuners/lora/dora.py:155-165, DoraLinearLayer.forward): the products
        # (mag_norm_scale - 1) * base_result and mag_norm_scale * lora_result keep both outputs for the
        # magnitude's gradient: the base layer's output (recomputed with dropout, F.linear) and B(A(x))
        if uses_dora(method):
            per_token += sum(2 * compute * shapes[t][1] for t in lora_targets(method))
    return per_token


def dora_kept_weight_bytes(model: ModelConfig, method: MethodConfig) -> int:
    """What one decoder layer's DoRA keeps besides per-token activations: with dropout, peft recomputes the
    base output from the dropped-out input (peft 0.21 tuners/lora/variants.py:243-246), ``F.linear(x,
    weight)`` with ``weight = dequantize_module_weight(base_layer).to(x.dtype)`` (dora.py:141-142, :163), and
    the matmul keeps that weight for x's gradient: a new tensor in the compute dtype, in x out, for QLoRA
    (dequantized) and for LoRA under bf16 autocast (its cast); LoRA computing in fp32 keeps the parameter
    itself. No dropout: the base layer's own output (counted per token), nothing more."""
    if not uses_dora(method) or not method.lora_dropout:
        return 0
    compute = compute_bytes(model)
    if method.name == "lora" and compute == 4:
        return 0
    shapes = linear_shapes(model)
    return sum(compute * shapes[t][0] * shapes[t][1] for t in lora_targets(method))


def dora_norm_bytes(model: ModelConfig, method: MethodConfig) -> int:
    """The transient of DoRA's weight norm, at its largest adapted Linear (every forward, and each
    recompute; peft 0.21 tuners/lora/dora.py): ``get_lora_weight`` runs B(A(eye(in))) (:94-99): an fp32
    identity of in x in (the adapter's dtype; under bf16 autocast also its bf16 cast) and B A as in x out in
    the compute dtype, cast to x's dtype when they differ (LoRA's x is fp32: peft casts inputs to the
    adapter's dtype; QLoRA's is the compute dtype under autocast); the base weight dequantized (QLoRA, the
    compute dtype) or cast to x's dtype (LoRA under bf16: fp32); ``get_weight_norm`` (:86-91) then holds
    scale x BA and W + scale x BA at once, in x's dtype. All of it lives until DoRA's forward returns."""
    if not uses_dora(method):
        return 0
    compute, qlora = compute_bytes(model), method.name == "qlora"
    x_dtype = compute if qlora else 4
    shapes = linear_shapes(model)

    def transient(fan_in: int, fan_out: int) -> int:
        weight = fan_in * fan_out
        identity = (4 + (compute if compute != 4 else 0)) * fan_in * fan_in
        lora_weight = (compute + (x_dtype if x_dtype != compute else 0)) * weight
        base = (compute if qlora else 4 if compute != 4 else 0) * weight
        return identity + lora_weight + base + 2 * x_dtype * weight

    return max(transient(*shapes[t]) for t in lora_targets(method))


def offloaded_activation_bytes(
    model: ModelConfig,
    method: MethodConfig,
    tokens: int,
    checkpointing: bool,
    strategy: str,
    kernels: Kernels,
) -> int:
    """Host RAM that activation offloading fills, per process: every layer's input with checkpointing
    (what the forward keeps), every layer's activations without."""
    if not kernels.offload:
        return 0
    residual = 4 if fp32_residual(method, strategy) else compute_bytes(model)
    per_layer = (
        residual * model.hidden_size
        if checkpointing
        else _layer_bytes_per_token(model, method, strategy, kernels)
    )
    return tokens * model.num_hidden_layers * per_layer


def attention_mask_bytes(seq_len: int, rows: int, compute: int, kernels: Kernels) -> int:
    """Packed rows under sdpa: transformers' block-diagonal bool mask (seq² per row), which PyTorch turns
    into an additive bias in the compute dtype for its memory-efficient kernel; nothing under
    FlashAttention-2 varlen, or without packing (a causal mask is implicit)."""
    return rows * seq_len * seq_len * (1 + compute) if kernels.packed_mask else 0


def reward_model(model: ModelConfig) -> ModelConfig:
    """stage=rm's model as the planner counts it: the decoder under a one-output ``score`` head instead of
    the LM head (transformers' ``LlamaForSequenceClassification``), so its weights are a tied model's, the
    head's ``hidden_size`` parameters aside (vocab x hidden fewer: 525M for 8B, 1.05B for 70B)."""
    return dataclasses.replace(model, tie_word_embeddings=True)


def lm_head_bytes(
    model: ModelConfig, method: MethodConfig, tokens: int, strategy: str = "single", *, fused: bool = True
) -> int:
    """The loss's working set.

    ``fused`` (GPU): TRL's chunked LM head: one logits tile in the compute dtype, the fp32 gradient of
    the hidden states, and for full fine-tuning the LM head's gradient accumulated in fp32 and cast to
    the head's dtype (no cast when the head is fp32: single/ddp); an fp32 head (full fine-tuning's under
    single/ddp) is cast one vocabulary chunk at a time (two alive as the loop moves on). QLoRA's frozen
    head is in the compute dtype. Not fused (CPU: the model's own loss): the fp32 logits and their
    log-softmax, the hidden states' gradient and, for full fine-tuning, the head's fp32 gradient.
    """
    compute, hidden, vocab = compute_bytes(model), model.hidden_size, model.vocab_size
    head_fp32 = fp32_residual(method, strategy)  # full fine-tuning's fp32 weights under single/ddp
    head_dtype = 4 if head_fp32 or compute == 4 else compute
    head_grad = vocab * hidden * (4 + (head_dtype if head_dtype != 4 else 0)) if method.name == "full" else 0
    if not fused:
        return 2 * tokens * vocab * 4 + tokens * hidden * 4 + head_grad
    chunk = min(vocab, TRL_VOCAB_TILE)
    tile = min(tokens, TRL_TOKEN_TILE) * chunk * compute
    head_cast = 2 * chunk * hidden * compute if head_dtype != compute else 0
    return tile + tokens * hidden * 4 + head_grad + head_cast


# ── the reference model of DPO/KTO ──────────────────────────────────────────────────────
# What a preference stage keeps to score its reference policy (train/run/preference.py), in words.
REFERENCES = {
    "none": "none (stage=sft and rm keep no reference model, nor grpo with stage.beta=0)",
    "weights": "a second, frozen copy of the weights in the compute dtype (full fine-tuning's ref_model)",
    "base": "none in memory: the base with the LoRA adapter disabled (peft), the run's starting model",
    "adapter": "a frozen fp32 copy of the adapter the run starts from (TRL's 'ref' adapter); base shared",
}


def reference_model(config: Config) -> str:
    """Which ``REFERENCES`` entry a run keeps, given its stage, method and ``stage.init_from``."""
    stage = config.stage
    if stage.name in ("sft", "rm") or (stage.name == "grpo" and not stage.beta):
        return "none"
    if config.method.name == "full":
        return "weights"
    if stage.name == "grpo":  # a new adapter on the start (an adapter run merged: train.run.preference)
        return "base"
    init_from = config.stage.init_from
    return "adapter" if init_from and (Path(init_from) / "adapter").is_dir() else "base"


def step_tokens(seq_len: int, batch: int, stage: str) -> int:
    """Tokens one forward with gradients holds: DPO and reward models score chosen and rejected of ``batch``
    pairs together (2 x batch sequences); KTO's reference and KL forwards keep no activations."""
    return seq_len * batch * (2 if stage in ("dpo", "rm") else 1)


def reference_bytes(model: ModelConfig, method: MethodConfig, reference: str) -> int:
    """The reference model's memory, before any sharding: the weights in the compute dtype, an fp32
    adapter (peft creates adapters in fp32), or nothing."""
    if reference == "weights":
        return compute_bytes(model) * count_parameters(model)
    if reference == "adapter":
        return DTYPE_BYTES["float32"] * adapter_parameters(model, method)
    return 0


# ── GRPO's generation ───────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Generation:
    """What stage=grpo generates at once on one GPU: ``sequences`` completions (its share of GRPOConfig's
    generation_batch_size), each up to ``tokens`` long, prompt included."""

    sequences: int
    tokens: int


def generation_bytes(model: ModelConfig, generation: Generation, gathered_weights: int) -> int:
    """The generation phase's working set (transformers' ``generate``): the KV cache of every sequence at its
    longest (K and V per layer in the compute dtype: ``kv_cache_bytes_per_token`` counts bf16, 4 B for fp32),
    the last position's logits in fp32 and their sampling probabilities, and, under ZeRO-3, the rest of
    the weights: TRL gathers the whole model on every rank to generate (``ds3_gather_for_generation``)."""
    kv = kv_cache_bytes_per_token(model) * compute_bytes(model) // 2
    logits = 2 * generation.sequences * model.vocab_size * 4
    return generation.sequences * generation.tokens * kv + logits + gathered_weights


# ── per GPU under a launch strategy ─────────────────────────────────────────────────────
_WORKING = (
    "gradients",
    "autocast_copies",
    "activations",
    "dora_norm",
    "attention_mask",
    "lm_head_loss",
    "step_temporaries",
)
_BACKWARD = ("autocast_copies", "activations", "dora_norm", "attention_mask", "lm_head_loss")


def frozen_bytes(model: ModelConfig, method: MethodConfig) -> int:
    """The base weights LoRA/QLoRA freeze: the compute dtype (LoRA); NF4 decoder Linears and the rest
    (embeddings, LM head, norms) in the compute dtype (QLoRA,
    ``train.model.build.prepare_4bit_for_training``). Full fine-tuning freezes nothing."""
    if method.name == "full":
        return 0
    if method.name == "qlora":
        return nf4_linear_bytes(model) + compute_bytes(model) * unquantized_parameters(model)
    return compute_bytes(model) * count_parameters(model)


def gathered_unit_bytes(model: ModelConfig, method: MethodConfig) -> int:
    """The largest unit FSDP/ZeRO-3 gathers whole, in the compute dtype (FSDP2's MixedPrecisionPolicy
    param_dtype; DeepSpeed's bf16 parameters), with its gradient in the same dtype (FSDP2 reduces in
    bf16 before casting each shard back to fp32). QLoRA's decoder Linears stay packed NF4."""
    compute, layers = compute_bytes(model), model.num_hidden_layers
    adapters = 0
    if method.name != "full":  # A and B, DoRA's magnitudes: each layer's own
        adapters = (lora_parameters(model, method) + dora_magnitude_parameters(model, method)) // layers
    if method.name == "qlora":
        norms = 2 * model.hidden_size
        unit = max(
            nf4_linear_bytes(model) // layers + compute * (norms + adapters), compute * largest_unit(model)
        )
    else:
        unit = compute * max(layer_parameters(model) + adapters, largest_unit(model))
    return unit + compute * (largest_unit(model) if method.name == "full" else adapters)


def per_gpu_bytes(
    model: ModelConfig,
    method: MethodConfig,
    strategy: str,
    gpus: int,
    *,
    tokens: int,
    optim: str,
    accumulation: int = 1,
    reference: str = "none",
    on_gpu: bool = True,
    kernels: Kernels = PLAIN,
    seq_len: int | None = None,
    context_parallel: int = 1,
    generation: Generation | None = None,
    reward: bool = False,
) -> dict[str, int]:
    """Each part of one GPU's memory (one process's, ``on_gpu=False``), and the ``peak``: the resident
    states plus the larger of the backward's working set (autocast copies, activations, a packed batch's
    attention mask, LM head) and the optimizer step (gradients, temporaries). ``kernels``: the fast
    path's effect on activations (``activation_bytes``); ``seq_len``: the row length of ``tokens``, for
    the packed mask (default: one row); ``context_parallel``: GPUs each sequence is split over
    (launch.cp_size), which divides what every token costs. ``reference``: the DPO/KTO reference model
    kept beside it (``REFERENCES``), sharded like the weights (TRL prepares it with the same FSDP/ZeRO-3
    engine; ZeRO-3 offload keeps it in CPU memory). ``cpu_total``: what ZeRO-3 offload keeps in host
    RAM, all GPUs; ``offloaded_activations``: what activation offloading keeps in host RAM, this process.
    ``generation`` (GRPO): the generation phase (``generation_bytes``) comes before the step's forward and
    backward, so the peak is the larger of the two phases on top of what stays resident. ``reward``
    (stage=rm, ``model`` as ``reward_model`` gives it): a one-output head in place of the LM head, so the
    loss holds no logits, only the hidden states' fp32 gradient.

    The trainer frees torch's gradients after each step (``zero_grad(set_to_none=True)``), and they grow
    as the backward frees activations, so the two phases do not add up; with ``accumulation`` > 1 the
    gradients of earlier micro-batches live through the next backward and do. DeepSpeed's gradient
    partitions are buffers allocated once: always resident.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"launch.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    per_param = trainable_bytes(method, strategy, optim, compute_bytes(model), on_gpu=on_gpu)
    trainable = trained_parameters(model, method)
    statistics = nf4_statistics_bytes(model) if method.name == "qlora" else 0  # every rank's, whole
    states = {
        "weights": frozen_bytes(model, method) - statistics + trainable * per_param.weight,
        "gradients": trainable * per_param.grad,
        "master": trainable * per_param.master,
        "optimizer": trainable * per_param.optimizer,
        "step_temporaries": trainable * per_param.step_temp,
        "reference": reference_bytes(model, method, reference),
    }
    if strategy == "zero2":
        shards_of = {**dict.fromkeys(states, gpus), "weights": 1, "reference": 1}
    else:
        shards_of = dict.fromkeys(states, gpus if strategy in SHARDED else 1)
    parts = {key: -(-value // shards_of[key]) for key, value in states.items()}
    parts["quant_statistics"] = statistics
    if strategy == "zero3":  # one optimizer sub-group at a time
        parts["step_temporaries"] = per_param.step_temp * min(-(-trainable // gpus), DEEPSPEED_SUB_GROUP)
    if strategy in TORCH_ENGINES and not on_gpu and per_param.optimizer:  # torch's per-tensor AdamW:
        largest = -(-largest_trained_tensor(model, method) // (gpus if strategy == "fsdp" else 1))
        parts["step_temporaries"] = 2 * 4 * largest  # sqrt(exp_avg_sq) and its quotient, one tensor at a time
    cpu_total = sum(states.values()) + statistics if strategy == "zero3_offload" else 0
    if strategy == "zero3_offload":  # DeepSpeed keeps all of it in CPU memory
        parts = dict.fromkeys(parts, 0)
    parts["gathered_unit"] = gathered_unit_bytes(model, method) if strategy in SHARDED else 0
    parts["ddp_buckets"] = parts["gradients"] if strategy == "ddp" else 0  # gradient_as_bucket_view=False
    parts["autocast_copies"] = autocast_copy_bytes(model, method, strategy)
    checkpointing = model.gradient_checkpointing
    seq_len = seq_len or tokens
    rows = tokens // seq_len
    tokens = -(-tokens // context_parallel)  # this GPU's part of every sequence
    parts["activations"] = activation_bytes(model, method, tokens, checkpointing, strategy, kernels)
    parts["dora_norm"] = dora_norm_bytes(model, method)
    parts["attention_mask"] = attention_mask_bytes(seq_len, rows, compute_bytes(model), kernels)
    head = tokens * model.hidden_size * 4  # a reward model's: the hidden states' gradient, no logits
    parts["lm_head_loss"] = head if reward else lm_head_bytes(model, method, tokens, strategy, fused=on_gpu)
    offloaded = offloaded_activation_bytes(model, method, tokens, checkpointing, strategy, kernels)
    working = [k for k in _WORKING if not (k == "gradients" and strategy in DEEPSPEED)]
    resident = sum(v for k, v in parts.items() if k not in working)
    backward = sum(parts[k] for k in _BACKWARD)
    step = parts["step_temporaries"]
    grads = parts["gradients"] if "gradients" in working else 0
    if accumulation > 1:
        parts["peak"] = resident + grads + max(backward, step)
    else:
        parts["peak"] = resident + max(backward, grads + step)
    if generation is not None:
        gathered = states["weights"] - parts["weights"] if strategy in ("zero3", "zero3_offload") else 0
        parts["generation"] = generation_bytes(model, generation, gathered)
        parts["peak"] = max(parts["peak"], resident + parts["generation"])
    parts["cpu_total"] = cpu_total
    parts["offloaded_activations"] = offloaded
    held = sum(parts[key] for key in ("weights", "quant_statistics", "reference"))  # as loading placed them
    parts["load"] = held + load_transient_bytes(model, method, strategy, gpus, on_gpu=on_gpu)
    return parts


# ── a training checkpoint: what each save writes, all ranks together ─────────────────────
def checkpoint_bytes(model: ModelConfig, method: MethodConfig, strategy: str, optim: str) -> int:
    """Bytes of one training checkpoint (``checkpoints/checkpoint-<step>/``): every trainable parameter as
    the engine holds it, its fp32 master copy (DeepSpeed) and its optimizer moments; a frozen base is not
    in it (an adapter run saves the adapter). 70B full with AdamW: 12 B x 70.55e9 = 0.85 TB.
    ``model.dtype`` is resolved (``Device.resolve``)."""
    per_param = trainable_bytes(method, strategy, optim, compute_bytes(model))
    return trained_parameters(model, method) * (per_param.weight + per_param.master + per_param.optimizer)


# ── loading the checkpoint: the peak on one GPU before training ─────────────────────────
def load_transient_bytes(
    model: ModelConfig, method: MethodConfig, strategy: str, gpus: int, *, on_gpu: bool = True
) -> int:
    """What loading holds on a GPU beside the weights already placed, at its worst.

    single, ddp, zero2: transformers places each tensor where it stays; QLoRA quantizes each decoder
    Linear from a copy in the compute dtype on the device (the largest Linear). FSDP, ZeRO-3: one whole
    tensor in flight, the largest (LM head or a Linear) in the dtype it loads in: accelerate's broadcast
    and each rank's cut of it (FSDP), the gathered parameter (ZeRO-3); the same for QLoRA, whose tensors
    rank 0 quantizes at step 0 (train/model/quantized_loading.py). On a CPU, ZeRO-3 QLoRA's rank 0 holds the
    tensor it read beside the gathered parameter it copies it into: two."""
    compute = compute_bytes(model)
    if strategy in ("single", "ddp", "zero2"):
        return compute * largest_linear(model) if method.name == "qlora" else 0
    dtype = 4 if method.name == "full" and strategy in TORCH_ENGINES else compute
    tensor = dtype * largest_tensor(model)
    if strategy == "fsdp":
        return tensor + -(-tensor // gpus)
    if method.name == "qlora" and strategy == "zero3" and not on_gpu:
        return 2 * tensor
    return tensor


# ── host RAM per node: loading the checkpoint, saving the final model ──────────────────
def host_bytes_per_node(
    model: ModelConfig, method: MethodConfig, strategy: str, processes_per_node: int, reference: str = "none"
) -> dict[str, int]:
    """Host RAM one node needs while loading the checkpoint (``load``) and writing the final model (``save``).

    Load: the weights in the dtype they load in, once per process that materializes them: every process
    under single/ddp/zero2; one per node under FSDP (cpu_ram_efficient_loading: local rank 0 loads, the
    others hold meta tensors until accelerate broadcasts) and ZeRO-3 (zero.Init: rank 0 reads the
    state dict). Full fine-tuning loads fp32 under torch engines (accelerate's FSDP2 upcasts a bf16 load
    to fp32 on rank 0 before sharding), the compute dtype under DeepSpeed; LoRA loads its base in the
    compute dtype. QLoRA holds nothing whole on the host: each process that reads (every process under
    single/ddp/zero2; rank 0 alone under FSDP/ZeRO-3, train/model/quantized_loading.py) holds the tensor it is
    quantizing onto its device, one at a time (``load_transient_bytes``). A full fine-tune's DPO reference
    is a second copy under the same rule.
    Save: full fine-tuning streams the weights in the compute dtype through one writing process (global
    rank 0, train/model/sharded_save.py) that holds one safetensors file at a time: at most
    ``SAVE_SHARD_BYTES``, or one tensor when a tensor is bigger; an adapter is small, fp32.
    """
    compute, params = compute_bytes(model), count_parameters(model)
    copies = processes_per_node if strategy in ("ddp", "zero2") else 1
    if method.name == "full":
        load = params * (4 if strategy in TORCH_ENGINES else compute)
    elif method.name == "lora":
        load = params * compute
    else:
        load = compute * largest_tensor(model)  # QLoRA: the tensor being quantized, per reading process
    load += reference_bytes(model, method, reference) if reference == "weights" else 0
    if method.name == "full":
        largest = largest_trainable_tensor(model, method)
        save = compute * max(min(SAVE_SHARD_BYTES // compute, params), largest)
    else:
        save = 4 * adapter_parameters(model, method)
    return {"load": copies * load, "save": save}
