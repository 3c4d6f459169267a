"""The memory planner: what a model × method × launch needs per GPU, and the smallest launch that fits.

    python -m train.plan model=8b method=qlora                  # seq_len, batch, GPU size from conf/
    python -m train.plan model=405b method=full gpu_memory=80GB
    python -m train.plan model=70b method=lora launch=zero3 seq_len=4096 batch=2 output=json
    python -m train.plan model=8b method=full stage=dpo data=preference_sample  # + DPO's reference model
    python -m train.plan model=8b device=local                  # as `python -m train` checks it here
    python -m train.plan max_context=true gpu_memory=80GB       # the longest context per size x method
    python -m train.plan recipes=true                           # every conf/experiment/ recipe, planned

Sizes are printed in GiB (2**30): GPU memory is sold in binary units (an "80 GB" H100 has 80 GiB).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

from train.plan.device import Device, parse_memory
from train.plan.fit import plan_run
from train.plan.report import format_plan, gib

PLANNER_OPTIONS = ("seq_len", "batch", "gpu_memory", "device", "output", "max_context", "recipes")
SIZES, METHODS = ("1b", "3b", "8b", "70b", "405b"), ("full", "lora", "qlora")
# GPU memory sizes sold (GiB), for "the smallest GPU a recipe fits": consumer 8-32, workstation and
# datacenter 40-141 (A100 40/80, L40S 48, H100 80, H200 141).
GPU_SIZES_GIB = (8, 12, 16, 24, 32, 40, 48, 80, 141)
CONTEXT_STEP = 1024  # the longest context is searched in whole multiples of this


def _count(options: dict[str, str], key: str, default: int) -> int:
    value = options.get(key, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{key}: {value!r} is not a positive whole number; write e.g. {key}={default}")
    return int(value)


def _device(options: dict[str, str], config) -> Device:
    """``gpu_memory=`` a GPU of that size; ``device=local`` this machine; default: the launch's GPUs."""
    where = options.get("device", "configured")
    if where not in ("configured", "local"):
        raise ValueError(f"device: {where!r}; use device=local (this machine) or device=configured")
    if "gpu_memory" in options:
        if where == "local":
            raise ValueError("gpu_memory: a GPU size and device=local exclude each other; give one")
        return Device.gpu(parse_memory(options["gpu_memory"]))
    return Device.local() if where == "local" else Device.configured(config.launch)


def longest_context(config, device: Device) -> tuple[int, object]:
    """The longest ``training.max_length`` (a multiple of ``CONTEXT_STEP``, at most the model's
    max_position_embeddings) whose plan fits ``device`` at the configured batch, and that plan; (0, the
    plan at ``CONTEXT_STEP``) when not even that fits. The peak grows with the length, so a bisection."""
    training = copy.copy(config.training)
    config = dataclasses.replace(config, training=training)

    def plan_at(steps: int):
        training.max_length = steps * CONTEXT_STEP
        return plan_run(config, device)

    low, high = 0, config.model.max_position_embeddings // CONTEXT_STEP
    best = plan_at(1)
    while low < high:
        middle = (low + high + 1) // 2
        plan = plan_at(middle)
        if plan.fits:
            low, best = middle, plan
        else:
            high = middle - 1
    return low * CONTEXT_STEP, best


def context_table(overrides: list[str], options: dict[str, str]) -> dict:
    """``max_context=true``: for every size x method (with the other overrides: launch, batch, fast path
    switches), the longest context that fits, as configured and with activation offloading. One sequence
    per row: packing is about many short sequences (and under sdpa adds a seq² mask per row)."""
    from train.config import compose_config, load_config

    rows = []
    for size in SIZES:
        for method in METHODS:
            cfg = compose_config([*overrides, f"model={size}", f"method={method}"])
            config = load_config(cfg, check=False)
            config.training.packing = "false"
            config.training.per_device_train_batch_size = _count(
                options, "batch", config.training.per_device_train_batch_size
            )
            device = _device(options, config)
            tokens, plan = longest_context(config, device)
            config.training.activation_offloading = True
            offloaded, offloaded_plan = longest_context(config, device)
            rows.append({
                "model": size, "method": method, "launch": plan.launch, "gpus": plan.gpus,
                "batch": plan.batch, "max_context": tokens, "peak_bytes_per_gpu": plan.peak_bytes_per_gpu,
                "max_context_offloaded": offloaded if device.kind == "cuda" else None,
                "peak_bytes_per_gpu_offloaded": offloaded_plan.peak_bytes_per_gpu,
                "host_bytes_offloaded": offloaded_plan.host_bytes_per_node["offloaded_activations"],
                "kernels": plan.kernels,
            })  # fmt: skip
    return {"device": device.name, "usable_bytes": plan.usable_bytes, "rows": rows}


def format_context_table(table: dict) -> str:
    def tokens(value) -> str:
        return "n/a (GPU only)" if value is None else f"{value:,}" if value else "none"

    lines = [
        f"longest context that fits on {table['device']} ({gib(table['usable_bytes'])} usable per GPU), "
        f"in steps of {CONTEXT_STEP:,} tokens, up to max_position_embeddings:",
        f"{'model':<6}{'method':<7}{'launch':<22}{'context':>10}{'peak':>13}   {'offloaded':>14}{'peak':>13}"
        f"{'host RAM':>14}",
    ]
    for row in table["rows"]:
        launch = f"{row['launch']} x{row['gpus']}, batch {row['batch']}"
        lines.append(
            f"{row['model']:<6}{row['method']:<7}{launch:<22}{tokens(row['max_context']):>10}"
            f"{gib(row['peak_bytes_per_gpu']):>13}   {tokens(row['max_context_offloaded']):>14}"
            f"{gib(row['peak_bytes_per_gpu_offloaded']):>13}{gib(row['host_bytes_offloaded']):>14}"
        )
    kernels = table["rows"][0]["kernels"]
    liger, offload = ("on" if kernels[key] else "off" for key in ("liger", "offload"))
    lines += [
        "",
        f"context: as configured, one sequence per row (Liger kernels {liger}, activation offloading "
        f"{offload}); offloaded: with training.activation_offloading=true (host RAM per node for it). The "
        "loss goes through TRL's fused LM head (no full logits) on a GPU.",
    ]
    return "\n".join(lines)


def recipe_table(overrides: list[str]) -> dict:
    """``recipes=true``: every ``conf/experiment/`` recipe (with ``overrides``) planned on its launch's GPUs
    (``launch.gpu_memory_gb``), and the smallest GPU size (``GPU_SIZES_GIB``) its launch fits on."""
    from data.config import CONF_DIR
    from train.config import compose_config, load_config

    rows = []
    for recipe in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        config = load_config(compose_config([f"+experiment={recipe}", *overrides]), check=False)
        plan = plan_run(config, Device.configured(config.launch))
        smallest = next(
            (size for size in GPU_SIZES_GIB if plan_run(config, Device.gpu(int(size * 2**30))).fits), None
        )
        training = config.training
        rows.append({
            "recipe": recipe, "model": config.model.name, "method": config.method.name,
            "stage": config.stage.name, "launch": plan.launch, "gpus": plan.gpus,
            "seq_len": training.max_length, "batch": training.per_device_train_batch_size,
            "accumulation": training.gradient_accumulation_steps,
            "peak_bytes_per_gpu": plan.peak_bytes_per_gpu, "smallest_gpu_gib": smallest,
        })  # fmt: skip
    return {"rows": rows}


def format_recipe_table(table: dict) -> str:
    lines = [
        "conf/experiment/ recipes, planned per GPU (python -m train +experiment=<recipe>):",
        f"{'recipe':<22}{'model':<9}{'method':<7}{'stage':<6}{'launch':<10}{'seq':>7}{'batch':>9}{'peak':>13}"
        f"   {'fits a GPU of':<14}",
    ]
    for row in table["rows"]:
        smallest = f"{row['smallest_gpu_gib']} GiB" if row["smallest_gpu_gib"] else "none listed"
        lines.append(
            f"{row['recipe']:<22}{row['model']:<9}{row['method']:<7}{row['stage']:<6}"
            f"{row['launch'] + ' x' + str(row['gpus']):<10}{row['seq_len']:>7,}"
            f"{str(row['batch']) + ' x ' + str(row['accumulation']):>9}{gib(row['peak_bytes_per_gpu']):>13}"
            f"   {smallest:<14}"
        )
    sizes = ", ".join(map(str, GPU_SIZES_GIB))
    lines += ["", f"fits: the peak within 90% of the GPU's memory on the recipe's launch; sizes {sizes} GiB."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Compose the config tree with the non-planner arguments as overrides, print the plan."""
    from train.config import ConfigError, compose_config, load_config

    options = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in PLANNER_OPTIONS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in PLANNER_OPTIONS]
    if options.get("max_context", "false") not in ("true", "false"):
        print(f"error: max_context: {options['max_context']!r}; use max_context=true", file=sys.stderr)
        return 2
    if options.get("recipes", "false") not in ("true", "false"):
        print(f"error: recipes: {options['recipes']!r}; use recipes=true", file=sys.stderr)
        return 2
    if options.get("recipes") == "true":
        table = recipe_table(overrides)
        print(json.dumps(table, indent=1) if options.get("output") == "json" else format_recipe_table(table))
        return 0
    if options.get("max_context") == "true":
        try:
            table = context_table([o for o in overrides if not o.startswith(("model=", "method="))], options)
        except (ConfigError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(table, indent=1) if options.get("output") == "json" else format_context_table(table))
        return 0
    cfg = compose_config(overrides)
    try:
        config = load_config(cfg, check=False)
        training = config.training
        training.max_length = _count(options, "seq_len", training.max_length)
        training.per_device_train_batch_size = _count(options, "batch", training.per_device_train_batch_size)
        device = _device(options, config)
        if options.get("output", "text") not in ("text", "json"):
            raise ValueError(f"output: {options['output']!r}; use output=text or output=json")
        plan = plan_run(config, device)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if options.get("output") == "json" else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
