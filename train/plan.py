"""The memory planner: what a model × method × launch needs per GPU, and the smallest launch that fits.

    python -m train.plan model=8b method=qlora                  # seq_len, batch, GPU size from conf/
    python -m train.plan model=405b method=full gpu_memory=80GB
    python -m train.plan model=70b method=lora launch=zero3 seq_len=4096 batch=2 output=json
    python -m train.plan model=8b method=full stage=dpo data=preference_sample  # + DPO's reference model

Everything is derived from the architecture in ``conf/model/`` and the run's settings, following
what this project's stack does (transformers, peft, TRL, bitsandbytes, torch/DeepSpeed optimizers);
docs/memory.md states each formula with its source and compares the figures with the launch post.
Sizes are bytes, printed in GiB (2**30): GPU memory is sold in binary units (an "80 GB" H100 has 80 GiB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from train.config import STRATEGIES, Config, ConfigError, LaunchConfig, MethodConfig, ModelConfig

GIB = 2**30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}  # auto: bf16 on a GPU (train/model.py)
SHARDED = ("fsdp", "zero3", "zero3_offload")  # weights, gradients and optimizer states split over all GPUs
DEEPSPEED = ("zero2", "zero3", "zero3_offload")
KV_TABLE_TOKENS = (1024, 16_384, 131_072)  # the launch post's 1k / 16k / 128k columns, in binary k
# bitsandbytes' quantize_4bit: absmax per 64 weights; double quant stores it in 8 bits with an fp32
# absmax per 256 of those blocks (bitsandbytes/functional.py, quantize_4bit defaults).
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
# TRL's fused LM head scores the vocabulary in [4096 tokens x 32768 vocab] tiles and never holds the
# full logits (trl 1.16: kernels/chunked_logprob.TOKEN_CHUNK_SIZE, trainer/utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32_768


# ── the architecture ───────────────────────────────────────────────────────────────────
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


def nf4_bytes(elements: int) -> int:
    """One bitsandbytes NF4 tensor with double quantization: 4-bit codes, 8-bit absmax, fp32 second level."""
    blocks = math.ceil(elements / NF4_BLOCK)
    return elements // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)


def weight_bytes(model: ModelConfig) -> dict[str, int]:
    """All weights at 2 / 1 / 0.5 bytes each, and as bitsandbytes loads QLoRA (``nf4_bnb``).

    bitsandbytes quantizes only the decoder Linears: the embedding is not a Linear and
    transformers keeps the LM head out of quantization, so both stay bf16, as do the norms.
    """
    params = count_parameters(model)
    linears = model.num_hidden_layers * sum(nf4_bytes(i * o) for i, o in linear_shapes(model).values())
    return {
        "bf16": 2 * params,
        "fp8": params,
        "int4": params // 2,
        "nf4_bnb": linears + 2 * _unquantized(model),
    }


def _unquantized(model: ModelConfig) -> int:
    quantized = model.num_hidden_layers * sum(i * o for i, o in linear_shapes(model).values())
    return count_parameters(model) - quantized


def lora_parameters(model: ModelConfig, method: MethodConfig) -> int:
    """LoRA's A (r x in) and B (out x r) per targeted Linear per layer; ``all-linear`` is every Linear
    of the layers (peft leaves the LM head out)."""
    targets = LINEARS if method.target_modules == "all-linear" else list(method.target_modules)
    unknown = [t for t in targets if t not in LINEARS]
    if unknown:
        raise ValueError(f"method.target_modules: {unknown} are not Llama Linears; use names from {LINEARS}")
    shapes = linear_shapes(model)
    return model.num_hidden_layers * sum(method.r * sum(shapes[t]) for t in targets)


def kv_cache_bytes_per_token(model: ModelConfig) -> int:
    """K and V, per layer, kv_heads x head_dim wide, in bf16: 131,072 bytes for 8B."""
    head_dim = model.hidden_size // model.num_attention_heads
    return 2 * model.num_hidden_layers * model.num_key_value_heads * head_dim * 2


# ── bytes per trainable parameter, and activations ────────────────────────────────────
@dataclass(frozen=True)
class TrainableBytes:
    """Bytes per trainable parameter. ``weight`` is 0 for full fine-tuning (already in the base weights)."""

    weight: int
    grad: int
    master: int  # DeepSpeed's fp32 copies of the weights and gradients that its optimizer steps
    optimizer: int  # the moments
    step_temp: int  # torch's foreach AdamW holds one parameter-sized temporary during the step


def trainable_bytes(method: MethodConfig, strategy: str, optim: str, compute: int) -> TrainableBytes:
    """What each trainable parameter costs under this method, engine and optimizer.

    Full: weights in the compute dtype; torch's AdamW keeps its moments in the parameter's dtype, so
    a bf16 run has no fp32 copy at all. LoRA: peft upcasts adapters to fp32 (TRL keeps them bf16 under
    ZeRO-3); QLoRA: TRL casts the adapters to bf16. DeepSpeed always steps fp32 master weights and
    fp32 gradients with fp32 moments, in its own fused optimizer, as DeepSpeed's
    estimate_zero2/3_model_states_mem_needs count them.
    """
    if method.name == "full" or method.name == "qlora" or strategy in DEEPSPEED:
        working = compute
    else:
        working = DTYPE_BYTES["float32"]
    states = 0 if optim.startswith("sgd") else 1 if "lion" in optim else 2  # Adam family (and unknown): 2
    weight = 0 if method.name == "full" else working
    if strategy in DEEPSPEED:
        value = 1 if "8bit" in optim else 4
        return TrainableBytes(weight, working, 8, states * value, 0)
    value = 1 if "8bit" in optim else 4 if "32bit" in optim else working
    foreach = "8bit" not in optim and "fused" not in optim and states > 0
    return TrainableBytes(weight, working, 0, states * value, working if foreach else 0)


def activation_bytes(model: ModelConfig, method: MethodConfig, tokens: int, checkpointing: bool) -> int:
    """What the backward pass keeps for ``tokens`` (batch x seq) tokens, sdpa/flash attention (no s² term).

    Per layer and token: both RMSNorms keep their input in fp32 (transformers upcasts), 4H each, and
    their output (2H; 4H under QLoRA, whose norms peft upcast to fp32); q, k, v after RoPE (H + 2 kv),
    the attention output and o_proj's copy of it (2H), gate, up, silu(gate), their product (4I), all
    bf16; LoRA adds, per targeted input element, the matmul's bf16 copy of its input and the dropout's
    mask or output (2 x 2 bytes; 2 without dropout), and r outputs per token.
    With checkpointing, each layer keeps only its input and one layer is recomputed at a time.
    Frozen Linears keep less (no input for a weight gradient): LoRA measures ~30% under this count.
    """
    compute = DTYPE_BYTES[model.dtype]
    residual = 4 if method.name == "qlora" else compute
    hidden = model.hidden_size
    kv = model.num_key_value_heads * hidden // model.num_attention_heads
    per_token = 2 * (4 * hidden + residual * hidden) + compute * (
        3 * hidden + 2 * kv + 4 * model.intermediate_size
    )
    if method.name != "full":
        shapes = linear_shapes(model)
        targets = LINEARS if method.target_modules == "all-linear" else method.target_modules
        per_input = 2 * compute if method.lora_dropout else compute
        per_token += sum(per_input * shapes[t][0] + compute * method.r for t in targets)
    layers = model.num_hidden_layers
    kept = (layers * residual * hidden + per_token) if checkpointing else layers * per_token
    final_norm = 4 * hidden + residual * hidden
    return tokens * (kept + final_norm)


def lm_head_bytes(model: ModelConfig, method: MethodConfig, tokens: int) -> int:
    """TRL's fused loss: one bf16 logits tile, the fp32 gradient of the hidden states, and for full
    fine-tuning the LM head's gradient accumulated in fp32 and cast back. QLoRA's fp32 head is cast
    to bf16 one vocabulary chunk at a time (two alive as the loop moves on)."""
    compute = DTYPE_BYTES[model.dtype]
    chunk = min(model.vocab_size, TRL_VOCAB_TILE)
    tile = min(tokens, TRL_TOKEN_TILE) * chunk * compute
    head_grad = model.vocab_size * model.hidden_size * (4 + compute) if method.name == "full" else 0
    head_cast = 2 * chunk * model.hidden_size * compute if method.name == "qlora" else 0
    return tile + tokens * model.hidden_size * 4 + head_grad + head_cast


_WORKING = ("gradients", "activations", "lm_head_loss", "step_temporaries")


# ── the reference model of DPO/KTO ──────────────────────────────────────────────────────
# What a preference stage keeps to score its reference policy (train/preference.py), in words.
REFERENCES = {
    "none": "none (stage=sft has no reference model)",
    "weights": "a second, frozen copy of the weights in the compute dtype (full fine-tuning's ref_model)",
    "base": "none in memory: the base with the LoRA adapter disabled (peft), the run's starting model",
    "adapter": "a frozen fp32 copy of the adapter the run starts from (TRL's 'ref' adapter); base shared",
}


def reference_model(config: Config) -> str:
    """Which ``REFERENCES`` entry a run keeps, given its stage, method and ``stage.init_from``."""
    if config.stage.name == "sft":
        return "none"
    if config.method.name == "full":
        return "weights"
    init_from = config.stage.init_from
    return "adapter" if init_from and (Path(init_from) / "adapter").is_dir() else "base"


def step_tokens(seq_len: int, batch: int, stage: str) -> int:
    """Tokens one forward with gradients holds: DPO scores chosen and rejected of ``batch`` pairs together
    (2 x batch sequences); KTO's reference and KL forwards keep no activations."""
    return seq_len * batch * (2 if stage == "dpo" else 1)


def reference_bytes(model: ModelConfig, method: MethodConfig, reference: str) -> int:
    """The reference model's memory, before any sharding: the weights in the compute dtype, an fp32
    adapter (peft creates adapters in fp32), or nothing."""
    if reference == "weights":
        return DTYPE_BYTES[model.dtype] * count_parameters(model)
    if reference == "adapter":
        return DTYPE_BYTES["float32"] * lora_parameters(model, method)
    return 0


# ── per GPU under a launch strategy ─────────────────────────────────────────────────────
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
) -> dict[str, int]:
    """Each part of one GPU's memory, and the ``peak``: the resident states plus the larger of the
    backward's working set (activations, LM head) and the optimizer step (gradients, temporaries).
    ``reference``: the DPO/KTO reference model kept beside it (``REFERENCES``), sharded like the weights
    (TRL prepares it with the same FSDP/ZeRO-3 engine; ZeRO-3 offload keeps it in CPU memory).

    The trainer frees gradients after each step (``zero_grad(set_to_none=True)``), and they grow as
    the backward frees activations, so the two phases do not add up; with ``accumulation`` > 1 the
    gradients of earlier micro-batches live through the next backward and do.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"launch.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    compute = DTYPE_BYTES[model.dtype]
    params, layer = count_parameters(model), layer_parameters(model)
    root = count_parameters(model) - model.num_hidden_layers * layer  # embeddings, LM head, final norm
    per_param = trainable_bytes(method, strategy, optim, compute)
    if method.name == "qlora":  # NF4 Linears; prepare_model_for_kbit_training upcasts the rest to fp32
        base = weight_bytes(model)["nf4_bnb"] + 2 * _unquantized(model)
        linears = sum(nf4_bytes(i * o) for i, o in linear_shapes(model).values())
        unit = max(linears + 4 * 2 * model.hidden_size, 4 * root)
    else:
        base, unit = compute * params, compute * max(layer, root)
    trainable = params if method.name == "full" else lora_parameters(model, method)
    unit_trainable = max(layer, root) if method.name == "full" else trainable // model.num_hidden_layers
    states = {
        "weights": base + trainable * per_param.weight,
        "gradients": trainable * per_param.grad,
        "master": trainable * per_param.master,
        "optimizer": trainable * per_param.optimizer,
        "step_temporaries": trainable * per_param.step_temp,
        "reference": reference_bytes(model, method, reference),
    }
    if strategy in ("zero3", "zero3_offload"):  # bf16 gradients exist only in the gathered unit
        states["gradients"] = 0
    shards = gpus if strategy in SHARDED else 1
    if strategy == "zero2":
        shards_of = {**dict.fromkeys(states, gpus), "weights": 1, "reference": 1}
    else:
        shards_of = dict.fromkeys(states, shards)
    parts = {key: -(-value // shards_of[key]) for key, value in states.items()}
    if strategy == "zero3_offload":  # DeepSpeed keeps all of it in CPU memory
        parts = dict.fromkeys(parts, 0)
    parts["gathered_unit"] = unit + unit_trainable * per_param.grad if strategy in SHARDED else 0
    parts["ddp_buckets"] = parts["gradients"] if strategy == "ddp" else 0  # gradient_as_bucket_view=False
    parts["activations"] = activation_bytes(model, method, tokens, model.gradient_checkpointing)
    parts["lm_head_loss"] = lm_head_bytes(model, method, tokens)
    resident = sum(v for k, v in parts.items() if k not in _WORKING)
    backward, step = parts["activations"] + parts["lm_head_loss"], parts["step_temporaries"]
    if accumulation > 1:
        parts["peak"] = resident + parts["gradients"] + max(backward, step)
    else:
        parts["peak"] = resident + max(backward, parts["gradients"] + step)
    parts["cpu_total"] = (
        sum(states.values()) - states["step_temporaries"] if strategy == "zero3_offload" else 0
    )
    return parts


@dataclass(frozen=True)
class Recommendation:
    gpus: int
    nodes: int
    launch: str  # the conf/launch file: the strategy's name, ``local`` for single
    strategy: str
    num_processes: int  # per node
    peak_bytes_per_gpu: int

    def overrides(self) -> str:
        """The command-line overrides that select this launch, and what they amount to."""
        gpus = f"{self.gpus} GPU{'s' * (self.gpus > 1)}"
        nodes = f"{self.nodes} node{'s' * (self.nodes > 1)}"
        return (
            f"launch={self.launch} launch.num_processes={self.num_processes} "
            f"launch.num_machines={self.nodes} ({gpus} on {nodes})"
        )


def recommend(
    model: ModelConfig,
    method: MethodConfig,
    *,
    tokens: int,
    optim: str,
    gpu_memory_bytes: int,
    accumulation: int = 1,
    usable_fraction: float = 0.9,
    gpus_per_node: int = 8,
    reference: str = "none",
) -> Recommendation | None:
    """The fewest GPUs of this size that fit the run, and the first strategy (in ``STRATEGIES`` order:
    single, ddp, zero2, fsdp, zero3) that fits there; ZeRO-3 offload only when none fits at any count.

    ``usable_fraction`` leaves room that the planner does not count: the CUDA context, the caching
    allocator's fragmentation and NCCL's buffers take about a tenth of a GPU in practice.
    ``gpus_per_node`` is an HGX/DGX node's eight.
    """
    usable = usable_fraction * gpu_memory_bytes

    def peak(strategy: str, gpus: int) -> int:
        parts = per_gpu_bytes(
            model, method, strategy, gpus, tokens=tokens, optim=optim, accumulation=accumulation,
            reference=reference,
        )  # fmt: skip
        return parts["peak"]

    def rec(strategy: str, gpus: int) -> Recommendation:
        name = "local" if strategy == "single" else strategy
        nodes = -(-gpus // gpus_per_node)
        return Recommendation(gpus, nodes, name, strategy, gpus // nodes, peak(strategy, gpus))

    if peak("single", 1) <= usable:
        return rec("single", 1)
    best = None
    for strategy in ("ddp", "zero2", "fsdp", "zero3"):
        if peak(strategy, 2**40) > usable:  # does not fit however many GPUs share it
            continue
        gpus = 2
        while peak(strategy, gpus) > usable:
            gpus = gpus * 2 if gpus < gpus_per_node else gpus + gpus_per_node
        if best is None or gpus < best.gpus:
            best = rec(strategy, gpus)
    if best is None and method.name != "qlora" and peak("zero3_offload", 1) <= usable:
        return rec("zero3_offload", 1)
    return best


# ── the plan for one run ────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class MemoryPlan:
    """Every figure the planner derives for one run; sizes in bytes."""

    model: str
    method: str
    launch: str
    strategy: str
    gpus: int
    nodes: int
    seq_len: int
    batch: int
    optim: str
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    stage: str
    reference: str  # a REFERENCES key
    params: int
    trainable_params: int
    weights_bytes: dict[str, int]
    kv_cache_bytes_per_token: int
    kv_cache_bytes: dict[int, int]
    activations_bytes: dict[str, int]
    logits_unfused_bytes: int
    per_gpu_bytes: dict[str, int]
    peak_bytes_per_gpu: int
    cpu_bytes_per_node: int
    gpu_memory_bytes: int
    usable_bytes: int
    fits: bool
    recommended: Recommendation | None
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["kv_cache_bytes"] = {str(tokens): size for tokens, size in self.kv_cache_bytes.items()}
        out["assumptions"] = list(self.assumptions)
        return out


def plan_memory(
    model: ModelConfig,
    method: MethodConfig,
    launch: LaunchConfig,
    *,
    seq_len: int,
    batch: int,
    optim: str = "adamw_torch",
    accumulation: int = 1,
    gpu_memory_bytes: int | None = None,
    usable_fraction: float = 0.9,
    stage: str = "sft",
    reference: str = "none",
) -> MemoryPlan:
    """The plan for this run on ``launch`` (its strategy, its num_processes x num_machines GPUs, and
    ``gpu_memory_bytes``, default ``launch.gpu_memory_gb`` GiB), plus the smallest launch that fits.

    ``usable_fraction``: see ``recommend``; ``stage``: ``step_tokens``; ``reference``: ``per_gpu_bytes``.
    """
    gpus = launch.num_processes * launch.num_machines
    tokens = step_tokens(seq_len, batch, stage)
    memory = gpu_memory_bytes if gpu_memory_bytes is not None else int(launch.gpu_memory_gb * GIB)
    parts = per_gpu_bytes(
        model, method, launch.strategy, gpus, tokens=tokens, optim=optim, accumulation=accumulation,
        reference=reference,
    )  # fmt: skip
    kv = kv_cache_bytes_per_token(model)
    trainable = count_parameters(model) if method.name == "full" else lora_parameters(model, method)
    checkpointing = {
        "with_checkpointing": activation_bytes(model, method, tokens, True),
        "without_checkpointing": activation_bytes(model, method, tokens, False),
    }
    return MemoryPlan(
        model=model.name, method=method.name, launch=launch.name, strategy=launch.strategy, gpus=gpus,
        nodes=launch.num_machines, seq_len=seq_len, batch=batch, optim=optim,
        gradient_accumulation_steps=accumulation, gradient_checkpointing=model.gradient_checkpointing,
        stage=stage, reference=reference, params=count_parameters(model), trainable_params=trainable,
        weights_bytes=weight_bytes(model),
        kv_cache_bytes_per_token=kv,
        kv_cache_bytes={t: t * kv for t in KV_TABLE_TOKENS}, activations_bytes=checkpointing,
        logits_unfused_bytes=tokens * model.vocab_size * 4,
        per_gpu_bytes={k: v for k, v in parts.items() if k not in ("peak", "cpu_total")},
        peak_bytes_per_gpu=parts["peak"], cpu_bytes_per_node=-(-parts["cpu_total"] // launch.num_machines),
        gpu_memory_bytes=memory, usable_bytes=int(usable_fraction * memory),
        fits=parts["peak"] <= usable_fraction * memory,
        recommended=recommend(model, method, tokens=tokens, optim=optim, gpu_memory_bytes=memory,
                              accumulation=accumulation, usable_fraction=usable_fraction,
                              reference=reference),
        assumptions=_assumptions(model, method, launch.strategy, optim, usable_fraction),
    )  # fmt: skip


def _assumptions(model: ModelConfig, method: MethodConfig, strategy: str, optim: str, usable: float):
    per_param = trainable_bytes(method, strategy, optim, DTYPE_BYTES[model.dtype])
    engine = "DeepSpeed" if strategy in DEEPSPEED else "torch"
    return (
        f"compute dtype {'bf16' if DTYPE_BYTES[model.dtype] == 2 else 'fp32'} (model.dtype={model.dtype}); "
        "sdpa/flash attention, so no seq² attention matrix",
        f"{engine} optimizer {optim}: per trainable parameter {per_param.weight} B adapter weight, "
        f"{per_param.grad} B gradient, {per_param.master} B fp32 master weights+gradients, "
        f"{per_param.optimizer} B moments, {per_param.step_temp} B step temporaries",
        "QLoRA: NF4 decoder Linears (double quant); embeddings, LM head and norms in fp32 after "
        "peft's prepare_model_for_kbit_training"
        if method.name == "qlora"
        else f"base weights in {'bf16' if DTYPE_BYTES[model.dtype] == 2 else 'fp32'}",
        "loss through TRL's fused LM head (tiles, no full logits); logits_unfused_bytes is the "
        "fp32 batch x seq x vocab buffer the model's own loss would add",
        "sharded strategies gather one unit at a time: the larger of a decoder layer and the "
        "root unit (embeddings + LM head + final norm)",
        f"fits means peak <= {usable:g} x GPU memory (CUDA context, fragmentation, NCCL buffers)",
    )


def gib(size: int | float, digits: int = 2) -> str:
    return f"{size / GIB:,.{digits}f} GiB"


def _reference_line(plan: MemoryPlan) -> str:
    size = plan.per_gpu_bytes.get("reference", 0)
    return f"reference model   {gib(size):>17}  per GPU: {REFERENCES[plan.reference]}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table a person reads; the same figures as ``to_dict``."""
    rec = plan.recommended
    lines = [
        f"Llama 3.1 {plan.model} · {plan.method} · launch={plan.launch} ({plan.strategy}, {plan.gpus} GPU"
        f"{'s' * (plan.gpus > 1)} of {gib(plan.gpu_memory_bytes)}) · seq_len {plan.seq_len} x batch "
        f"{plan.batch} (x{plan.gradient_accumulation_steps} accumulation) · {plan.optim} · gradient "
        f"checkpointing {'on' if plan.gradient_checkpointing else 'off'} · stage={plan.stage}",
        "",
        f"parameters        {plan.params:>17,}",
        f"trainable         {plan.trainable_params:>17,}  ({plan.trainable_params / plan.params:.2%})",
        "weights (all parameters, inference):",
        f"  bf16            {gib(plan.weights_bytes['bf16']):>17}",
        f"  fp8             {gib(plan.weights_bytes['fp8']):>17}",
        f"  int4            {gib(plan.weights_bytes['int4']):>17}  (0.5 byte per parameter)",
        f"  nf4 bnb         {gib(plan.weights_bytes['nf4_bnb']):>17}  (NF4 + double quant on decoder "
        "Linears; embeddings, LM head, norms stay bf16)",
        f"KV cache (bf16)   {plan.kv_cache_bytes_per_token:>17,} bytes per token; "
        + ", ".join(f"{t:,} tokens {gib(b, 3)}" for t, b in plan.kv_cache_bytes.items()),
        f"activations       {gib(plan.activations_bytes['with_checkpointing']):>17}  with checkpointing, "
        f"{gib(plan.activations_bytes['without_checkpointing'])} without; full fp32 logits would add "
        f"{gib(plan.logits_unfused_bytes)}",
        *([_reference_line(plan)] if plan.stage != "sft" else []),
        "",
        "per GPU at the peak:",
        *(f"  {part:<16}{gib(size):>17}" for part, size in plan.per_gpu_bytes.items() if size),
        f"  {'peak':<16}{gib(plan.peak_bytes_per_gpu):>17}  = "
        + (
            "resident + gradients + max(activations + lm_head_loss, step_temporaries)"
            if plan.gradient_accumulation_steps > 1
            else "resident + max(activations + lm_head_loss, gradients + step_temporaries)"
        ),
    ]
    if plan.cpu_bytes_per_node:
        lines.append(f"  CPU memory per node (offloaded states): {gib(plan.cpu_bytes_per_node)}")
    if plan.method == "qlora" and plan.strategy == "zero3_offload":
        lines.append("note: QLoRA cannot run here: DeepSpeed cannot offload bitsandbytes' Params4bit")
    lines += [
        f"fits: {'yes' if plan.fits else 'NO'} (peak {gib(plan.peak_bytes_per_gpu)} vs "
        f"{gib(plan.usable_bytes)} usable)",
        "smallest setup that fits: "
        + (
            f"{rec.overrides()}, peak {gib(rec.peak_bytes_per_gpu)} per GPU"
            if rec
            else "none at this GPU size"
        ),
        "assumptions:",
        *(f"  - {line}" for line in plan.assumptions),
    ]
    return "\n".join(lines)


# ── the fit check a training run makes before loading weights ──────────────────────────
def fit_problems(config: Config, usable_fraction: float = 0.9) -> list[str]:
    """Why this run cannot fit or cannot work on its launch, each 'key: what (planner figures); try: fix'.

    Empty when it fits. Figures use training.max_length x per_device_train_batch_size tokens.
    """
    model, method, launch = config.model, config.method, config.launch
    plan = plan_memory(
        model, method, launch, seq_len=config.training.max_length,
        batch=config.training.per_device_train_batch_size, optim=config.training.optim,
        accumulation=config.training.gradient_accumulation_steps, usable_fraction=usable_fraction,
        stage=config.stage.name, reference=reference_model(config),
    )  # fmt: skip
    figures = (
        f"planner figures: peak {gib(plan.peak_bytes_per_gpu)} per GPU vs {gib(plan.usable_bytes)} usable "
        f"of {launch.gpu_memory_gb:g} GiB"
    )
    if method.load_in_4bit and launch.strategy == "zero3_offload":
        sharded = [s for s in ("fsdp", "zero3") if _fits(plan, model, method, s, launch, usable_fraction)]
        where = f"launch={' or launch='.join(sharded)} with {plan.gpus} GPUs" if sharded else _suggest(plan)
        return [
            "launch.strategy: QLoRA's 4-bit weights (bitsandbytes Params4bit) cannot be offloaded by "
            f"DeepSpeed ZeRO-3 parameter offload ({figures}); try: {where} (QLoRA shards under FSDP and "
            "ZeRO-3 once bnb_4bit_quant_storage is set to the compute dtype)"
        ]
    if plan.fits:
        return []
    return [
        f"launch: model={model.name} method={method.name} does not fit launch={launch.name} on {plan.gpus} "
        f"GPU{'s' * (plan.gpus > 1)} ({figures}); try: {_suggest(plan)}"
    ]


def check_fits(config: Config) -> None:
    """Raise ConfigError with ``fit_problems`` when the run cannot fit: both entry points call it
    before anything expensive (``python -m launch`` before a job waits in a queue)."""
    problems = fit_problems(config)
    if problems:
        raise ConfigError(
            "the run cannot fit (python -m train.plan shows the full plan):\n  " + "\n  ".join(problems)
        )


def _fits(plan, model, method, strategy, launch, usable_fraction) -> bool:
    parts = per_gpu_bytes(
        model, method, strategy, plan.gpus, tokens=step_tokens(plan.seq_len, plan.batch, plan.stage),
        optim=plan.optim, accumulation=plan.gradient_accumulation_steps, reference=plan.reference,
    )  # fmt: skip
    return parts["peak"] <= usable_fraction * plan.gpu_memory_bytes


def _suggest(plan: MemoryPlan) -> str:
    if plan.recommended is None:
        return (
            "method=qlora or lora, a smaller seq_len (training.max_length) or batch, or GPUs with more "
            "memory (launch.gpu_memory_gb)"
        )
    return plan.recommended.overrides()


# ── python -m train.plan ───────────────────────────────────────────────────────────────
PLANNER_OPTIONS = ("seq_len", "batch", "gpu_memory", "output")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80' (GiB), '1.5TB' -> bytes; GPU memory is sold in binary units."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(
            f"gpu_memory: {text!r} is not a size; write e.g. gpu_memory=80GB or gpu_memory=1.5TB"
        )
    number, unit = float(match.group(1)), (match.group(2) or "g").lower()
    return int(number * 2 ** (10 * ("kmgt".index(unit) + 1)))


def _count(options: dict[str, str], key: str, default: int) -> int:
    value = options.get(key, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{key}: {value!r} is not a positive whole number; write e.g. {key}={default}")
    return int(value)


def main(argv: list[str]) -> int:
    """Compose the config tree with the non-planner arguments as overrides, print the plan."""
    from train.config import ConfigError, compose_config, load_config

    options = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in PLANNER_OPTIONS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in PLANNER_OPTIONS]
    cfg = compose_config(overrides)
    try:
        config = load_config(cfg, check=False)
        seq_len = _count(options, "seq_len", config.training.max_length)
        batch = _count(options, "batch", config.training.per_device_train_batch_size)
        memory = parse_memory(options["gpu_memory"]) if "gpu_memory" in options else None
        if options.get("output", "text") not in ("text", "json"):
            raise ValueError(f"output: {options['output']!r}; use output=text or output=json")
        plan = plan_memory(
            config.model, config.method, config.launch, seq_len=seq_len, batch=batch,
            optim=config.training.optim, accumulation=config.training.gradient_accumulation_steps,
            gpu_memory_bytes=memory, stage=config.stage.name, reference=reference_model(config),
        )  # fmt: skip
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if options.get("output") == "json" else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
