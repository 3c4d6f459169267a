"""CPU step time: the model's own loss (our default on CPU) against TRL's chunked LM-head kernel.

Runs the default job twice, identical but for ``training.cpu_fused_lm_head``, and prints
both side by side: trainer runtime, seconds per step, and the logged losses (which must
match: the two compute the same cross-entropy).

    python bench/cpu_loss.py [extra train overrides...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 8


def run(fused: bool, workdir: Path, extra: list[str]) -> dict:
    run_dir = workdir / ("trl-fused" if fused else "model-loss")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            f"hydra.run.dir={run_dir}",
            f"training.max_steps={STEPS}",
            "training.logging_steps=1",
            "training.report_to=[]",
            f"training.cpu_fused_lm_head={str(fused).lower()}",
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        # the end-of-run summary (TRL also logs a running train_runtime on every step's row)
        "runtime": next(r["train_runtime"] for r in rows if "train_loss" in r),
        "losses": [round(r["loss"], 4) for r in rows if "loss" in r],
    }


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as workdir:
        baseline = run(True, Path(workdir), extra)
        ours = run(False, Path(workdir), extra)
    print(f"{'':<34}{'TRL chunked kernel':>20}{'model loss (ours)':>20}")
    label = f"train runtime, {STEPS} steps (s)"
    print(f"{label:<34}{baseline['runtime']:>20.1f}{ours['runtime']:>20.1f}")
    print(f"{'seconds per step':<34}{baseline['runtime'] / STEPS:>20.2f}{ours['runtime'] / STEPS:>20.2f}")
    print(f"{'speed-up':<34}{'1.00x':>20}{baseline['runtime'] / ours['runtime']:>19.2f}x")
    print(f"losses equal: {baseline['losses'] == ours['losses']}  {ours['losses']}")


if __name__ == "__main__":
    main()
