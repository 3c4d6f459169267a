"""Sweeps: after a Hydra multirun, one table of every point (sweep.csv in the sweep directory).

    python -m train -m method=lora,qlora method.r=8,16

Each point trains into its own directory (``multirun/<date>/<time>/<n>/``); at the end
``sweep.csv`` lists each point's overrides, final loss, final eval loss (data.eval_split), tokens/s and
peak memory.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SWEEP_FILE = "sweep.csv"
COLUMNS = ("point", "overrides", "status", "final_loss", "eval_loss", "tokens_per_second", "peak_memory_gb",
           "run_dir")  # fmt: skip


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per point directory (those Hydra numbered 0, 1, ...); a point that did not finish says so."""
    from train.outputs import METRICS_FILE, read_metrics  # here: Hydra loads this callback before every run

    rows = []
    for run_dir in sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        metrics = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
        losses = [row["loss"] for row in metrics if "loss" in row]
        evaluated = [row["eval_loss"] for row in metrics if "eval_loss" in row]
        final = {key: value for row in metrics for key, value in row.items()}
        rows.append(
            {
                "point": int(run_dir.name),
                "overrides": " ".join(overrides),
                "status": "finished" if "train_loss" in final else "not finished",
                # the last logged loss; a run shorter than logging_steps has only its mean train_loss
                "final_loss": losses[-1] if losses else final.get("train_loss", ""),
                "eval_loss": evaluated[-1] if evaluated else "",  # the held-out loss at the end: what ranks
                "tokens_per_second": final.get("train_tokens_per_second", ""),
                "peak_memory_gb": final.get("peak_memory_gb", ""),
                "run_dir": str(run_dir),
            }
        )
    return rows


class SweepSummary(Callback):
    """Writes ``sweep.csv`` when a multirun ends (registered under ``hydra.callbacks``, conf/config.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        with (sweep_dir / SWEEP_FILE).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(sweep_rows(sweep_dir))
        logging.getLogger("train").info("sweep summary: %s", sweep_dir / SWEEP_FILE)
