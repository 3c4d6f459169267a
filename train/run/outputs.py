"""What a run leaves behind: resolved config, metrics.jsonl, loss.png, the final adapter or weights."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from train.run.run_dir import CONFIG_FILE

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the fully resolved config, so the run can be reproduced from its directory alone.

    Call it on global rank 0 only: every process of a launch runs it otherwise, into one shared file."""
    path = run_dir / CONFIG_FILE
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


class MetricsJsonl(TrainerCallback):
    """Appends every trainer log (loss, lr, grad norm, ...) as one JSON line, on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            self.keep_until(state.global_step)

    def keep_until(self, step: int) -> None:
        """Resuming at ``step``: drop what the interrupted run logged after its checkpoint, and its
        end-of-run rows, so the log reads as one run, each step once. At step 0 (a run that died before
        its first checkpoint, started again in its directory) nothing is kept."""
        rows = [
            row
            for row in read_metrics(self.path)
            if row["step"] <= step and not {"train_loss", "peak_memory_gb"} & row.keys()
        ]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        temporary.replace(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._write({"step": state.global_step, "epoch": state.epoch, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            end = {"step": state.global_step, "peak_memory_gb": peak_memory_bytes() / 2**30}
            if state.best_metric is not None:  # training.metric_for_best_model, at its best checkpoint
                end["best_metric"] = state.best_metric
                end["best_model_checkpoint"] = state.best_model_checkpoint
            self._write(end)

    def _write(self, row: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")


def peak_memory_bytes() -> int:
    """GPU: the most memory torch allocated; CPU: the process's peak resident set (Linux's VmHWM, which
    ``reset_peak_memory`` can start afresh; getrusage's ru_maxrss where there is no /proc)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory() -> None:
    """Start this run's peak memory afresh, with what earlier runs of the process left given back: a local
    sweep runs its points one after another in one process (Hydra's basic launcher), and each point's
    ``peak_memory_gb`` must be its own. GPU: torch's cache emptied, its peak statistics reset; CPU: freed
    heap returned to the OS (malloc_trim), then the kernel's high-water mark reset (/proc/self/clear_refs)."""
    import torch

    from train.model.placement import release_freed_host_memory

    release_freed_host_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        pass


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, png_path: Path) -> Path:
    """Draw training loss, eval loss where the run evaluated, and learning rate against step, from
    ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(metrics_path) if "loss" in row]
    evaluated = [row for row in read_metrics(metrics_path) if "eval_loss" in row]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(
        [r["step"] for r in rows], [r["loss"] for r in rows], marker="o", markersize=3, label="training loss"
    )
    if evaluated:
        loss_axis.plot(
            [r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], marker="s", markersize=5,
            color="tab:orange", label="eval loss (held out)",
        )  # fmt: skip
        loss_axis.legend(loc="upper right")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    if rows and "learning_rate" in rows[0]:
        lr_axis = loss_axis.twinx()
        lr_axis.plot(
            [r["step"] for r in rows], [r["learning_rate"] for r in rows], color="tab:gray", alpha=0.5
        )
        lr_axis.set_ylabel("learning rate", color="tab:gray")
    loss_axis.set_title(f"loss, run {metrics_path.parent.parent.name} {metrics_path.parent.name}")
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def final_dir(run_dir: Path, method: str) -> Path:
    """Where the finished model goes: ``adapter/`` for LoRA/QLoRA, ``model/`` for full fine-tuning."""
    return run_dir / ("model" if method == "full" else "adapter")
