"""``python -m launch.deepspeed_ops``: compile DeepSpeed's CPU ops now, once, instead of at their first use.

On a machine without a GPU DeepSpeed runs on its CPU accelerator, and JIT-compiles two C++ ops the first
time a run needs them: its shared-memory collectives (every DeepSpeed launch) and CPU Adam (optimizer
offload), ~1.5 min together on 2 cores, cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). ``make install`` calls this so that the first run (or test) does not pay
it. On a GPU machine it does nothing: DeepSpeed builds the CUDA variants where they are first used.
"""

from __future__ import annotations

import os
import sys

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("a GPU is visible: DeepSpeed compiles its ops where they are first used")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for name in CPU_OPS:
        print(f"DeepSpeed's {name}: compiling (or found compiled) ...", flush=True)
        get_accelerator().create_op_builder(name).load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
