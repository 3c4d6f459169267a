"""Sweeps: after a Hydra multirun, one table of every point (sweep.csv) and its picture (sweep.png).

    python -m train -m method=lora,qlora method.r=8,16                  # a grid (Hydra's basic sweeper)
    python -m train +experiment=search_lr_rank                          # a search (hydra/sweeper=optuna)

Each point trains into its own directory (``multirun/<date>/<time>/<n>/``); at the end ``sweep.csv``
lists each point's overrides, final loss, final eval loss (data.eval_split), the best-checkpoint metric
(training.metric_for_best_model), tokens/s and peak memory, and ``sweep.png`` draws the eval loss of
every point, the best one marked. A run returns its final eval loss (``objective``): what Optuna minimizes.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SWEEP_FILE = "sweep.csv"
SWEEP_PLOT_FILE = "sweep.png"
COLUMNS = ("point", "overrides", "status", "final_loss", "eval_loss", "eval_reward", "best_metric",
           "tokens_per_second", "peak_memory_gb", "run_dir")  # fmt: skip


def objective(log_history: list[dict], stage: str = "sft") -> float | None:
    """What a run returns to Hydra: its last eval loss (the evaluation at the end), None without one; for
    stage=grpo, whose loss says nothing of how good the policy is, minus its last held-out mean reward. The
    Optuna sweeper minimizes it; the basic sweeper ignores it."""
    key, sign = ("eval_reward", -1.0) if stage == "grpo" else ("eval_loss", 1.0)
    evaluated = [row[key] for row in log_history if row.get(key) is not None]
    return sign * float(evaluated[-1]) if evaluated else None


def searching(hydra_config) -> bool:
    """This multirun is an Optuna search (``hydra/sweeper=optuna``), which needs every run's eval loss."""
    return "optuna" in str(hydra_config.sweeper.get("_target_", "")).lower()


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per point directory (those Hydra numbered 0, 1, ...); a point that did not finish says so."""
    from train.run.outputs import (  # here: Hydra loads this callback before every run
        METRICS_FILE,
        read_metrics,
    )

    rows = []
    for run_dir in sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        metrics = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
        losses = [row["loss"] for row in metrics if "loss" in row]
        evaluated = [row["eval_loss"] for row in metrics if "eval_loss" in row]
        rewards = [row["eval_reward"] for row in metrics if row.get("eval_reward") is not None]  # grpo
        final = {key: value for row in metrics for key, value in row.items()}
        rows.append(
            {
                "point": int(run_dir.name),
                "overrides": " ".join(overrides),
                "status": "finished" if "train_loss" in final else "not finished",
                # the last logged loss; a run shorter than logging_steps has only its mean train_loss
                "final_loss": losses[-1] if losses else final.get("train_loss", ""),
                "eval_loss": evaluated[-1] if evaluated else "",  # the held-out loss at the end: what ranks
                "eval_reward": rewards[-1] if rewards else "",  # stage=grpo: the held-out mean reward
                "best_metric": final.get("best_metric", ""),  # metric_for_best_model at its best checkpoint
                "tokens_per_second": final.get("train_tokens_per_second", ""),
                "peak_memory_gb": final.get("peak_memory_gb", ""),
                "run_dir": str(run_dir),
            }
        )
    return rows


def plot_sweep(rows: list[dict], path: Path) -> bool:
    """Each point's final eval loss as a bar, labelled with its overrides, the lowest in another colour;
    False (nothing drawn) when no point evaluated."""
    evaluated = [row for row in rows if row["eval_loss"] != ""]
    if not evaluated:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    losses = [float(row["eval_loss"]) for row in evaluated]
    best = losses.index(min(losses))
    figure, axes = plt.subplots(figsize=(9, 1.4 + 0.35 * len(evaluated)))
    colors = ["tab:green" if index == best else "tab:blue" for index in range(len(evaluated))]
    bars = axes.barh(range(len(evaluated)), losses, color=colors)
    low, high = min(losses), max(losses)
    margin = (high - low) or abs(high) * 0.01 or 0.01
    decimals = max(2, 2 - math.floor(math.log10(margin)))  # enough to tell the closest points apart
    axes.bar_label(bars, [f"{loss:.{decimals}f}" for loss in losses], padding=3, fontsize=8)
    axes.set_yticks(range(len(evaluated)), point_labels(evaluated), fontsize=8)
    axes.invert_yaxis()  # point 0 on top, as in sweep.csv
    axes.set_xlim(max(0.0, low - margin), high + 0.4 * margin)
    axes.ticklabel_format(axis="x", useOffset=False)
    axes.set_xlabel("final eval loss (held out); lowest in green")
    axes.set_title(f"{path.parent}: {len(evaluated)} of {len(rows)} points evaluated", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def point_labels(rows: list[dict]) -> list[str]:
    """``<point>: <the overrides that differ between points>``, numbers to 3 significant digits: what tells
    the points apart, not what they share."""

    def short(value: str) -> str:
        try:
            return value if value.isdigit() else f"{float(value):.3g}"
        except ValueError:
            return value

    settings = [dict(item.split("=", 1) for item in row["overrides"].split() if "=" in item) for row in rows]
    varying = [key for key in dict.fromkeys(k for point in settings for k in point)
               if len({point.get(key) for point in settings}) > 1]  # fmt: skip
    return [
        f"{row['point']}: " + " ".join(f"{key}={short(point[key])}" for key in varying if key in point)
        for row, point in zip(rows, settings, strict=True)
    ]


class SweepSummary(Callback):
    """Writes ``sweep.csv`` and ``sweep.png`` when a multirun ends (``hydra.callbacks``, conf/config.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # before the sweeper starts: Optuna's study (hydra.sweeper.storage) may live in the sweep directory
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        with (sweep_dir / SWEEP_FILE).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        log = logging.getLogger("train")
        log.info("sweep summary: %s", sweep_dir / SWEEP_FILE)
        if plot_sweep(rows, sweep_dir / SWEEP_PLOT_FILE):
            log.info("sweep picture: %s", sweep_dir / SWEEP_PLOT_FILE)
