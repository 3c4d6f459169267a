"""The fit check a run makes before anything expensive: ``python -m train`` against the device it computes
on, ``python -m launch`` against the GPUs its launch config names, both before any weight loads."""

from __future__ import annotations

import dataclasses

from train.config import Config, ConfigError, generation_batch_size
from train.plan.device import Device
from train.plan.memory import Generation, Kernels, reference_model
from train.plan.report import gib
from train.plan.run import MemoryPlan, plan_memory


def plan_run(config: Config, device: Device, usable_fraction: float = 0.9) -> MemoryPlan:
    """The plan of the composed training run: seq_len = training.max_length, batch =
    per_device_train_batch_size, its optimizer, accumulation, stage, reference model and fast path."""
    training = config.training
    return plan_memory(
        config.model, config.method, config.launch, seq_len=training.max_length,
        batch=training.per_device_train_batch_size, optim=training.optim,
        accumulation=training.gradient_accumulation_steps, device=device, usable_fraction=usable_fraction,
        stage=config.stage.name, reference=reference_model(config), kernels=planned_kernels(config, device),
        generation=planned_generation(config),
    )  # fmt: skip


def planned_generation(config: Config) -> Generation | None:
    """GRPO's generation on one GPU: its share of the generation batch
    (``train.config.generation_batch_size``, as the run passes it to TRL), each prompt and completion within
    ``training.max_length``."""
    if config.stage.name != "grpo":
        return None
    world = config.launch.num_processes * config.launch.num_machines
    batch = generation_batch_size(config)
    return Generation(sequences=-(-batch // world), tokens=config.training.max_length)


def planned_kernels(config: Config, device: Device) -> Kernels:
    """The fast path a run on ``device`` takes (train/model/fast_path.py ``resolve``: ``auto`` decided for a
    GPU or not; Liger and flash-attn as installed here, so a plan made on a login node without them counts the
    plainer path, which needs more memory)."""
    from train.model.fast_path import attention, resolve

    on_gpu, cp = device.kind == "cuda", config.launch.cp_size
    chosen = attention(config.model.attn_implementation, on_gpu)
    path = resolve(config.training, config.stage.name, chosen, on_gpu, cp)
    return Kernels(
        liger=path.use_liger_kernel,
        offload=path.activation_offloading and on_gpu,
        packed_mask=path.packing and path.attention == "sdpa",
    )


def fit_problems(config: Config, device: Device | None = None, usable_fraction: float = 0.9) -> list[str]:
    """Why this run cannot fit or cannot work on its launch on ``device`` (default: this machine,
    ``Device.local``), each 'key: what (planner figures); try: fix'. Empty when it fits."""
    device = device or Device.local()
    method, launch = config.method, config.launch
    plan = plan_run(config, device, usable_fraction)
    figures = _figures(config, plan, device, usable_fraction)
    if method.load_in_4bit and launch.strategy == "zero3_offload":
        sharded = [s for s in ("fsdp", "zero3") if _with_strategy(config, s, device, usable_fraction).fits]
        where = f"launch={' or launch='.join(sharded)} with {plan.gpus} GPUs" if sharded else _suggest(plan)
        return [
            "launch.strategy: QLoRA's 4-bit weights (bitsandbytes Params4bit) cannot be offloaded by "
            f"DeepSpeed ZeRO-3 parameter offload ({figures}); try: {where} (QLoRA shards under FSDP and "
            "ZeRO-3 once bnb_4bit_quant_storage is set to the compute dtype)"
        ]
    if plan.fits:
        return []
    if device.kind == "cuda":
        where = f"{plan.gpus} GPU{'s' * (plan.gpus > 1)}"
        fix = _suggest(plan)
    else:
        where = f"{device.name}, {launch.num_processes} process{'es' * (launch.num_processes > 1)}"
        fix = _suggest_off_gpu(config, plan, device, usable_fraction)
    return [
        f"launch: model={config.model.name} method={method.name} does not fit launch={launch.name} on "
        f"{where} ({figures}); try: {fix}"
    ]


def check_fits(config: Config, device: Device | None = None) -> None:
    """Raise ConfigError with ``fit_problems`` when the run cannot fit on ``device`` (default: this
    machine). ``python -m train`` calls it for the device it computes on; ``python -m launch`` for
    ``Device.configured(config.launch)``, before a job waits in a queue."""
    problems = fit_problems(config, device)
    if problems:
        raise ConfigError(
            "the run cannot fit (python -m train.plan shows the full plan):\n  " + "\n  ".join(problems)
        )


def _figures(config: Config, plan: MemoryPlan, device: Device, usable_fraction: float) -> str:
    if device.kind == "cuda":
        unit, of = "GPU", f"of {device.name}"
    else:
        processes = f"{config.launch.num_processes} process{'es' * (config.launch.num_processes > 1)}"
        unit, of = "process", f"({usable_fraction:g} x {gib(device.memory_bytes)} RAM / {processes})"
    return (
        f"planner figures: peak {gib(plan.peak_bytes_per_gpu)} per {unit} in {plan.compute_dtype} "
        f"(model.dtype={config.model.dtype}) vs {gib(plan.usable_bytes)} usable {of}"
    )


def _with_strategy(config: Config, strategy: str, device: Device, usable_fraction: float) -> MemoryPlan:
    launch = dataclasses.replace(config.launch, strategy=strategy)
    return plan_run(dataclasses.replace(config, launch=launch), device, usable_fraction)


def _suggest(plan: MemoryPlan) -> str:
    if plan.recommended is None:
        return (
            "method=qlora or lora, a smaller seq_len (training.max_length) or batch, or GPUs with more "
            "memory (launch.gpu_memory_gb)"
        )
    return plan.recommended.overrides()


def _suggest_off_gpu(config: Config, plan: MemoryPlan, device: Device, usable_fraction: float) -> str:
    """On a CPU: QLoRA here when LoRA does not fit, a GPU launch that fits, the tiny model."""
    fixes = []
    if config.method.name == "lora":
        qlora = dataclasses.replace(config.method, name="qlora", load_in_4bit=True)
        here = plan_run(dataclasses.replace(config, method=qlora), device, usable_fraction)
        if here.fits:
            fixes.append(f"method=qlora (peak {gib(here.peak_bytes_per_gpu)} per process here)")
    elif config.method.name == "full":
        fixes.append("method=lora or method=qlora (python -m train.plan device=local ... plans them here)")
    if plan.recommended is not None:
        fixes.append(f"a GPU machine: {plan.recommended.overrides()} of {plan.recommended_on}")
    fixes.append("model=tiny (the default) to try the pipeline on this CPU")
    return ", or ".join(fixes)
