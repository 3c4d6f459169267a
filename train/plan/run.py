"""The plan for one run: every figure for a model x method x launch on a device, and the smallest launch
that fits on GPUs of that size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from train.config import LaunchConfig, MethodConfig, ModelConfig
from train.plan.architecture import (
    count_parameters,
    kv_cache_bytes_per_token,
    weight_bytes,
)
from train.plan.device import Device
from train.plan.memory import (
    DEEPSPEED,
    KV_TABLE_TOKENS,
    PLAIN,
    SAVE_SHARD_BYTES,
    Generation,
    Kernels,
    activation_bytes,
    checkpoint_bytes,
    compute_bytes,
    host_bytes_per_node,
    per_gpu_bytes,
    reward_model,
    step_tokens,
    trainable_bytes,
    trained_parameters,
)


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
    kernels: Kernels = PLAIN,
    seq_len: int | None = None,
    generation: Generation | None = None,
    reward: bool = False,
) -> Recommendation | None:
    """The fewest GPUs of this size that fit the run, and the first strategy (in ``STRATEGIES`` order:
    single, ddp, zero2, fsdp, zero3) that fits there; ZeRO-3 offload only when none fits at any count.

    ``usable_fraction`` leaves room that the planner does not count: the CUDA context, the caching
    allocator's fragmentation and NCCL's buffers take about a tenth of a GPU in practice.
    ``gpus_per_node`` is an HGX/DGX node's eight. ``model.dtype`` is resolved (``Device.resolve``).
    ``generation`` (GRPO): each GPU's generation as the run's launch has it, counted for every candidate
    (more GPUs would each generate fewer sequences: an upper bound).
    """
    usable = usable_fraction * gpu_memory_bytes

    def peak(strategy: str, gpus: int) -> int:
        parts = per_gpu_bytes(
            model, method, strategy, gpus, tokens=tokens, optim=optim, accumulation=accumulation,
            reference=reference, kernels=kernels, seq_len=seq_len, generation=generation, reward=reward,
        )  # fmt: skip
        return max(parts["peak"], parts["load"])  # training, or loading before it

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


@dataclass(frozen=True)
class MemoryPlan:
    """Every figure the planner derives for one run; sizes in bytes. On a CPU device, "per GPU" is per
    process and ``gpu_memory_bytes`` is the host RAM's share of one process."""

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
    device: str  # Device.name
    device_kind: str  # cuda or cpu
    compute_dtype: str  # model.dtype as resolved for the device
    params: int
    trainable_params: int
    weights_bytes: dict[str, int]
    kv_cache_bytes_per_token: int
    kv_cache_bytes: dict[int, int]
    activations_bytes: dict[str, int]
    kernels: dict[str, bool]  # the fast path as counted (memory.Kernels): liger, offload, packed_mask
    logits_unfused_bytes: int
    per_gpu_bytes: dict[str, int]
    peak_bytes_per_gpu: int
    load_bytes_per_gpu: int  # loading's peak, before training: the weights placed + tensors in flight
    cpu_bytes_per_node: int  # ZeRO-3 offload's states in host RAM
    host_bytes_per_node: dict[str, int]  # host RAM while loading the checkpoint / saving the final model
    checkpoint_bytes: int  # one training checkpoint, all ranks: what each save (and a stop request) writes
    gpu_memory_bytes: int
    usable_bytes: int
    fits: bool
    recommended: Recommendation | None
    recommended_on: str  # the GPUs ``recommended`` is sized for
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["kv_cache_bytes"] = {str(tokens): size for tokens, size in self.kv_cache_bytes.items()}
        out["assumptions"] = list(self.assumptions)
        return out


_NOT_PER_GPU = ("peak", "load", "cpu_total", "offloaded_activations")


def plan_memory(
    model: ModelConfig,
    method: MethodConfig,
    launch: LaunchConfig,
    *,
    seq_len: int,
    batch: int,
    optim: str = "adamw_torch",
    accumulation: int = 1,
    device: Device | None = None,
    usable_fraction: float = 0.9,
    stage: str = "sft",
    reference: str = "none",
    kernels: Kernels = PLAIN,
    generation: Generation | None = None,
) -> MemoryPlan:
    """The plan for this run on ``launch`` (its strategy, its num_processes x num_machines GPUs) on
    ``device`` (default: the GPUs the launch names, ``Device.configured``), plus the smallest launch
    that fits on GPUs of that size (on a CPU device: on the launch's GPUs).

    ``usable_fraction``: see ``recommend``; ``stage``: ``step_tokens``; ``reference``, ``kernels``,
    ``generation`` (GRPO): ``per_gpu_bytes``.
    """
    reward = stage == "rm"
    if reward:  # no LM head
        model = reward_model(model)
    device = device or Device.configured(launch)
    resolved = device.resolve(model)
    on_gpu = device.kind == "cuda"
    gpus = launch.num_processes * launch.num_machines
    tokens = step_tokens(seq_len, batch, stage)
    memory = device.memory_per_process(launch.num_processes)
    parts = per_gpu_bytes(
        resolved, method, launch.strategy, gpus, tokens=tokens, optim=optim, accumulation=accumulation,
        reference=reference, on_gpu=on_gpu, kernels=kernels, seq_len=seq_len, context_parallel=launch.cp_size,
        generation=generation, reward=reward,
    )  # fmt: skip
    load = parts["load"]
    gpu = device if on_gpu else Device.configured(launch)
    host = host_bytes_per_node(resolved, method, launch.strategy, launch.num_processes, reference)
    host["offloaded_activations"] = launch.num_processes * parts["offloaded_activations"]
    kv = kv_cache_bytes_per_token(model)
    checkpointing = {
        "with_checkpointing": activation_bytes(resolved, method, tokens, True, launch.strategy, kernels),
        "without_checkpointing": activation_bytes(resolved, method, tokens, False, launch.strategy, kernels),
    }
    return MemoryPlan(
        model=model.name, method=method.name, launch=launch.name, strategy=launch.strategy, gpus=gpus,
        nodes=launch.num_machines, seq_len=seq_len, batch=batch, optim=optim,
        gradient_accumulation_steps=accumulation, gradient_checkpointing=model.gradient_checkpointing,
        stage=stage, reference=reference, device=device.name, device_kind=device.kind,
        compute_dtype=resolved.dtype, params=count_parameters(model),
        trainable_params=trained_parameters(model, method), weights_bytes=weight_bytes(model),
        kv_cache_bytes_per_token=kv, kv_cache_bytes={t: t * kv for t in KV_TABLE_TOKENS},
        activations_bytes=checkpointing, kernels=dataclasses.asdict(kernels),
        logits_unfused_bytes=0 if reward else tokens * model.vocab_size * 4,
        per_gpu_bytes={k: v for k, v in parts.items() if k not in _NOT_PER_GPU},
        peak_bytes_per_gpu=parts["peak"], load_bytes_per_gpu=load,
        cpu_bytes_per_node=-(-parts["cpu_total"] // launch.num_machines),
        host_bytes_per_node=host,
        checkpoint_bytes=checkpoint_bytes(resolved, method, launch.strategy, optim),
        gpu_memory_bytes=memory, usable_bytes=int(usable_fraction * memory),
        fits=max(parts["peak"], load) <= usable_fraction * memory,
        recommended=recommend(gpu.resolve(model), method, tokens=tokens, optim=optim,
                              gpu_memory_bytes=gpu.memory_bytes, accumulation=accumulation,
                              usable_fraction=usable_fraction, reference=reference, kernels=kernels,
                              seq_len=seq_len, generation=generation, reward=reward),
        recommended_on=gpu.name,
        assumptions=_assumptions(model, resolved, method, launch.strategy, optim, usable_fraction, device),
    )  # fmt: skip


def _assumptions(requested, model, method, strategy, optim, usable: float, device: Device) -> tuple[str, ...]:
    per_param = trainable_bytes(method, strategy, optim, compute_bytes(model), on_gpu=device.kind == "cuda")
    engine = "DeepSpeed" if strategy in DEEPSPEED else "torch"
    compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[model.dtype]
    on = "GPU" if device.kind == "cuda" else "CPU"
    base = {
        "full": "",
        "lora": f"frozen base in {compute}; ",
        "qlora": f"frozen base: NF4 decoder Linears (double quant); embeddings, LM head and norms in "
        f"{compute} (train.model.build.prepare_4bit_for_training); ",
    }[method.name]
    return (
        f"compute dtype {compute} on the {on} (model.dtype={requested.dtype}); sdpa/flash attention, so no "
        "seq² attention matrix",
        f"{base}{engine} optimizer {optim}: per trainable parameter {per_param.weight} B weight, "
        f"{per_param.grad} B gradient, {per_param.master} B fp32 master weight, {per_param.optimizer} B "
        f"moments, {per_param.step_temp} B step temporaries (docs/memory.md, Precision policy)",
        "loss through TRL's fused LM head (tiles, no full logits); logits_unfused_bytes is the fp32 batch "
        "x seq x vocab buffer the model's own loss adds"
        if device.kind == "cuda"
        else "loss through the model's own cross-entropy (CPU): fp32 logits and their log-softmax",
        "sharded strategies gather one unit at a time: the larger of a decoder layer and the tail "
        "(LM head + final norm), in the compute dtype",
        f"host RAM: the checkpoint once per loading process; the final save streams "
        f"{SAVE_SHARD_BYTES / 1e9:g} GB shards",
        f"fits means peak <= {usable:g} x "
        + (
            "GPU memory (CUDA context, fragmentation, NCCL buffers)"
            if device.kind == "cuda"
            else "RAM / processes"
        ),
    )
