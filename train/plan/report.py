"""The plan as a table a person reads (``python -m train.plan``): the figures of ``MemoryPlan.to_dict``."""

from __future__ import annotations

from train.plan.memory import GIB, REFERENCES, SAVE_SHARD_BYTES
from train.plan.run import MemoryPlan


def gib(size: int | float, digits: int = 2) -> str:
    return f"{size / GIB:,.{digits}f} GiB"


def _reference_line(plan: MemoryPlan) -> str:
    size = plan.per_gpu_bytes.get("reference", 0)
    return f"reference model   {gib(size):>17}  per GPU: {REFERENCES[plan.reference]}"


def _host_lines(plan: MemoryPlan) -> list[str]:
    load, save = plan.host_bytes_per_node["load"], plan.host_bytes_per_node["save"]
    if plan.method == "qlora" and plan.strategy in ("fsdp", "zero3"):
        how = "rank 0 reads and quantizes one tensor at a time; each rank keeps its shard"
    elif plan.method == "qlora":
        how = "each process quantizes one tensor at a time onto its device"
    elif plan.strategy in ("ddp", "zero2"):
        how = f"each of the node's {plan.gpus // plan.nodes} processes reads the checkpoint"
    elif plan.strategy == "single":
        how = "the one process reads the checkpoint"
    else:
        how = "one copy per node: rank 0 reads it, the other ranks get their shards from it"
    saving = (
        f"rank 0 writes one safetensors file of up to {SAVE_SHARD_BYTES / 1e9:g} GB at a time"
        if plan.method == "full"
        else "the adapter only"
    )
    offloaded = plan.host_bytes_per_node.get("offloaded_activations", 0)
    return [
        "host RAM per node:",
        f"  {'load':<16}{gib(load):>17}  ({how})",
        f"  {'final save':<16}{gib(save):>17}  ({saving})",
        *(
            [f"  {'activations':<16}{gib(offloaded):>17}  (offloaded by training.activation_offloading)"]
            if offloaded
            else []
        ),  # fmt: skip
        f"checkpoint        {gib(plan.checkpoint_bytes):>17}  each save, all ranks together (trainable "
        "weights, fp32 master, optimizer moments)",
    ]


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table a person reads; the same figures as ``to_dict``."""
    rec = plan.recommended
    unit = "GPU" if plan.device_kind == "cuda" else "process"
    memory = "" if plan.device_kind == "cuda" else " RAM share"
    lines = [
        f"Llama 3.1 {plan.model} · {plan.method} · launch={plan.launch} ({plan.strategy}, {plan.gpus} "
        f"{unit}{'es' * (plan.gpus > 1 and unit == 'process')}{'s' * (plan.gpus > 1 and unit == 'GPU')} "
        f"of {gib(plan.gpu_memory_bytes)}{memory}) on {plan.device}, computing in {plan.compute_dtype} · "
        f"seq_len {plan.seq_len} x batch {plan.batch} (x{plan.gradient_accumulation_steps} accumulation) · "
        f"{plan.optim} · gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'} · "
        f"stage={plan.stage}",
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
        f"fast path         {_kernels_line(plan)}",
        f"activations       {gib(plan.activations_bytes['with_checkpointing']):>17}  with checkpointing, "
        f"{gib(plan.activations_bytes['without_checkpointing'])} without; full fp32 logits would add "
        f"{gib(plan.logits_unfused_bytes)}",
        *([_reference_line(plan)] if plan.reference != "none" else []),
        "",
        f"per {unit} at the peak:",
        *(f"  {part:<16}{gib(size):>17}" for part, size in plan.per_gpu_bytes.items() if size),
        f"  {'peak':<16}{gib(plan.peak_bytes_per_gpu):>17}  = " + _peak_rule(plan),
        f"  {'loading peak':<16}{gib(plan.load_bytes_per_gpu):>17}  = weights as placed + "
        + _load_rule(plan),
    ]
    if plan.cpu_bytes_per_node:
        lines.append(f"  CPU memory per node (offloaded states): {gib(plan.cpu_bytes_per_node)}")
    lines += _host_lines(plan)
    if plan.method == "qlora" and plan.strategy == "zero3_offload":
        lines.append("note: QLoRA cannot run here: DeepSpeed cannot offload bitsandbytes' Params4bit")
    lines += [
        f"fits: {'yes' if plan.fits else 'NO'} (peak "
        f"{gib(max(plan.peak_bytes_per_gpu, plan.load_bytes_per_gpu))} vs {gib(plan.usable_bytes)} usable)",
        f"smallest setup that fits on {plan.recommended_on}: "
        + (f"{rec.overrides()}, peak {gib(rec.peak_bytes_per_gpu)} per GPU" if rec else "none"),
        "assumptions:",
        *(f"  - {line}" for line in plan.assumptions),
    ]
    return "\n".join(lines)


def _kernels_line(plan: MemoryPlan) -> str:
    kernels = plan.kernels
    return (
        f"Liger kernels {'on' if kernels['liger'] else 'off'}, activation offloading "
        f"{'on' if kernels['offload'] else 'off'}, "
        + ("packed rows under sdpa (a seq² mask per row)" if kernels["packed_mask"] else "no dense mask")
        + " (train/model/fast_path.py)"
    )


def _load_rule(plan: MemoryPlan) -> str:
    if plan.strategy in ("single", "local", "ddp", "zero2"):
        return "the largest Linear, being quantized" if plan.method == "qlora" else "nothing (placed in turn)"
    if plan.strategy == "fsdp":
        return "the largest tensor whole and this GPU's cut of it (rank 0's broadcast)"
    if plan.method == "qlora" and plan.strategy == "zero3" and plan.device_kind != "cuda":
        return "the largest tensor twice (rank 0's read, the gathered parameter it writes)"
    return "the largest tensor, gathered"


def _peak_rule(plan: MemoryPlan) -> str:
    rule = _step_rule(plan)
    if plan.per_gpu_bytes.get("generation"):  # GRPO generates before each step: the larger phase counts
        return f"the larger of resident + generation and {rule}"
    return rule


def _step_rule(plan: MemoryPlan) -> str:
    dora = " + dora_norm" if plan.per_gpu_bytes.get("dora_norm") else ""  # DoRA's weight-norm transient
    backward = f"autocast_copies + activations{dora} + attention_mask + lm_head_loss"
    if plan.strategy in ("zero2", "zero3", "zero3_offload"):  # DeepSpeed's gradient partitions are resident
        return f"resident (gradient partitions included) + max({backward}, step_temporaries)"
    if plan.gradient_accumulation_steps > 1:
        return f"resident + gradients + max({backward}, step_temporaries)"
    return f"resident + max({backward}, gradients + step_temporaries)"
