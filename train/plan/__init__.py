"""The memory planner (``python -m train.plan``): what a model × method × launch needs per GPU and per
node, on the device it will compute on, and the smallest launch that fits. docs/memory.md derives
every figure.

- ``architecture``: parameters, the units FSDP gathers, NF4 storage, the KV cache;
- ``memory``: bytes (the precision policy's per parameter, activations, the loss, per GPU under a
  strategy, host RAM per node);
- ``device``: the device a run computes on (this machine, or the GPUs a launch names);
- ``run``: the plan of one run and the smallest launch that fits;
- ``report``: the plan as a table; ``fit``: the check before a run; ``__main__``: the command line.
"""

from train.plan.architecture import (
    count_parameters,
    kv_cache_bytes_per_token,
    largest_unit,
    layer_parameters,
    lora_parameters,
    nf4_bytes,
    weight_bytes,
)
from train.plan.device import Device, host_memory_bytes, parse_memory
from train.plan.fit import check_fits, fit_problems, plan_run
from train.plan.memory import (
    DTYPE_BYTES,
    GIB,
    REFERENCES,
    activation_bytes,
    checkpoint_bytes,
    host_bytes_per_node,
    per_gpu_bytes,
    reference_model,
    trainable_bytes,
)
from train.plan.report import format_plan, gib
from train.plan.run import MemoryPlan, Recommendation, plan_memory, recommend

__all__ = [
    "DTYPE_BYTES", "GIB", "REFERENCES", "Device", "MemoryPlan", "Recommendation", "activation_bytes",
    "check_fits", "checkpoint_bytes", "count_parameters", "fit_problems", "format_plan", "gib",
    "host_bytes_per_node", "host_memory_bytes", "kv_cache_bytes_per_token", "largest_unit",
    "layer_parameters", "lora_parameters", "nf4_bytes", "parse_memory", "per_gpu_bytes", "plan_memory",
    "plan_run", "recommend", "reference_model", "trainable_bytes", "weight_bytes",
]  # fmt: skip
