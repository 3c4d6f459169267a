"""The device a run computes on, as the planner needs it: its kind, its memory, what ``dtype=auto`` becomes.

``Device.local()`` is this machine (``python -m train`` checks the fit against it); ``Device.configured``
is the GPU a launch config names (``python -m launch`` plans jobs on a login node, for the GPUs they
will get). torch is imported only by ``local()``, so rendering a job stays instant.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from train.config import LaunchConfig, ModelConfig
from train.plan.memory import GIB

# cgroup memory limits (v2, then v1): a Slurm job or a container may get less than the machine has.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    memory_bytes: int  # one GPU's memory; on a CPU the host RAM, shared by the node's processes
    compute_dtype: str  # what model.dtype=auto computes in here (train/model/build.py compute_dtype)
    name: str  # how a message names it

    @classmethod
    def gpu(cls, memory_bytes: int, name: str | None = None) -> Device:
        return cls("cuda", memory_bytes, "bfloat16", name or f"{memory_bytes / GIB:g} GiB GPUs")

    @classmethod
    def configured(cls, launch: LaunchConfig) -> Device:
        """The GPUs ``launch`` asks for: ``launch.gpu_memory_gb`` GiB each, computing in bf16."""
        gib = launch.gpu_memory_gb
        return cls.gpu(int(gib * GIB), f"{gib:g} GiB GPUs (launch.gpu_memory_gb)")

    @classmethod
    def local(cls) -> Device:
        """This machine: its CUDA GPU's total memory (all GPUs of a node assumed alike), in bf16 where the
        GPU has it; without one, host RAM (``host_memory_bytes``) in fp32, as train/model/build.py
        computes."""
        import torch

        if torch.cuda.is_available():
            # get_device_properties creates no CUDA context (mem_get_info would, on GPU 0, in every rank)
            properties = torch.cuda.get_device_properties(torch.cuda.current_device())
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
            name = f"this machine's {properties.name} ({properties.total_memory / GIB:.2f} GiB)"
            return cls("cuda", properties.total_memory, dtype, name)
        memory = host_memory_bytes()
        return cls("cpu", memory, "float32", f"this machine's CPU (no CUDA GPU; {memory / GIB:.2f} GiB RAM)")

    @property
    def compute(self) -> str:
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.compute_dtype]

    def resolve(self, model: ModelConfig) -> ModelConfig:
        """``model`` with ``dtype: auto`` replaced by what this device computes in."""
        return dataclasses.replace(model, dtype=self.compute_dtype) if model.dtype == "auto" else model

    def memory_per_process(self, processes_per_node: int) -> int:
        """A GPU is one process's; host RAM is shared by every process of the node."""
        return self.memory_bytes if self.kind == "cuda" else self.memory_bytes // processes_per_node


def host_memory_bytes() -> int:
    """Physical RAM (MemTotal), or the cgroup's memory limit where that is lower (Slurm, containers).

    Total, not MemAvailable: like a GPU's total memory, it is what a run may count on, and it does not
    change with what else happens to run at the moment of the check.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


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
