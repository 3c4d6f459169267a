"""TRL's own SFT script as installed (``trl/scripts/sft.py``, what ``trl sft`` runs), unchanged, plus what
bench/gpu_recipe.py needs from it afterwards: the trainer's log and the process's peak memory, as JSON.

    python bench/plain_trl_sft.py --record plain.json <the arguments of trl sft>

The script reads a local directory holding ``train.jsonl`` as ``--dataset_name`` (datasets' json builder),
so only the record is added here: ``sft.main`` keeps its trainer to itself, so the one it builds is kept as
it is built. Peak memory as our runs measure theirs (``train.run.outputs.peak_memory_bytes``: GPU
``torch.cuda.max_memory_allocated``, CPU the peak resident set), from the start of ``main``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import trl
from trl.scripts import sft

from train.run.outputs import peak_memory_bytes, reset_peak_memory


def main(argv: list[str]) -> None:
    # transformers 5 swaps RMSNorm/RoPE for Hub kernels on CUDA by default (use_kernels, USE_HUB_KERNELS=YES),
    # fetched from the Hub: on an offline GPU node the load fails. Off, as our runs have them unless asked
    # (train.model.build.hub_kernels_asked): both sides of bench/gpu_recipe.py compute with the same layers.
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    record = Path(argv[argv.index("--record") + 1])
    del argv[argv.index("--record") : argv.index("--record") + 2]
    script_args, training_args, model_args, dataset_args = sft.make_parser().parse_args_and_config(argv)

    built = []

    class KeptSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    trl.SFTTrainer = KeptSFTTrainer  # sft.main imports it from trl when it runs
    reset_peak_memory()
    started = time.monotonic()
    sft.main(script_args, training_args, model_args, dataset_args)
    record.write_text(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "peak_memory_bytes": peak_memory_bytes(),
                "log_history": built[0].state.log_history,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
