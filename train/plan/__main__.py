"""The memory planner: what a model × method × launch needs per GPU, and the smallest launch that fits.

    python -m train.plan model=8b method=qlora                  # seq_len, batch, GPU size from conf/
    python -m train.plan model=405b method=full gpu_memory=80GB
    python -m train.plan model=70b method=lora launch=zero3 seq_len=4096 batch=2 output=json
    python -m train.plan model=8b method=full stage=dpo data=preference_sample  # + DPO's reference model
    python -m train.plan model=8b device=local                  # as `python -m train` checks it here

Sizes are printed in GiB (2**30): GPU memory is sold in binary units (an "80 GB" H100 has 80 GiB).
"""

from __future__ import annotations

import json
import sys

from train.plan.device import Device, parse_memory
from train.plan.fit import plan_run
from train.plan.report import format_plan

PLANNER_OPTIONS = ("seq_len", "batch", "gpu_memory", "device", "output")


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


def main(argv: list[str]) -> int:
    """Compose the config tree with the non-planner arguments as overrides, print the plan."""
    from train.config import ConfigError, compose_config, load_config

    options = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in PLANNER_OPTIONS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in PLANNER_OPTIONS]
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
