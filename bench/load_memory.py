"""Host memory while 2 processes load one checkpoint: DDP (every process reads it) against FSDP (local
rank 0 reads, the others get its broadcast) and DeepSpeed ZeRO-3 (zero.Init partitions while reading), for
LoRA and QLoRA (rank 0 reads and quantizes one tensor at a time, each rank keeps its shard:
train/model/quantized_loading.py).

Builds a random-weight Llama-3.1-architecture checkpoint once (fp32 safetensors, 2.6 GiB: hidden 1024,
32 layers, the real 128,256 vocabulary), then for each launch and method runs

    python -m launch launch=<ddp|fsdp|zero3> launch.num_processes=2 launch.run=true \
        model.path=<checkpoint> method=<lora|qlora> training.max_steps=2 ...

(``single``: ``python -m train`` alone, one process with twice the batch) and samples every rank's memory
while it loads and trains: resident memory (RSS), anonymous memory (``RssAnon``: what the process itself
holds; RSS also counts the checkpoint's file pages a process has mapped) and the checkpoint's pages the
process has mapped (``/proc/<pid>/smaps``). A process holds ~0.9 GiB before any weight (python, torch,
transformers, TRL); DDP's rank 1 adds a whole copy of the weights on top.

    python bench/load_memory.py [--runs ddp:lora fsdp:qlora ...] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# The checkpoint's architecture: a Llama 3.1 shape (vocabulary, GQA, rope) whose fp32 weights pass 2.5 GB, so
# a copy per process is plainly visible against the ~0.9 GiB a process holds without weights. The 128,256
# vocabulary makes the embedding and LM head 0.5 GB each, 38% of it (2% in 8B, 1.5% in 70B): a rank that
# gathers or receives one whole tensor at a time shows that transient on top of its shard. A decoder
# layer is 54 MB; the LM head, 525 MB, is the largest tensor a rank ever holds whole while loading.
ARCHITECTURE = [
    "model.hidden_size=1024",
    "model.intermediate_size=3584",
    "model.num_hidden_layers=32",
    "model.num_attention_heads=8",
    "model.num_key_value_heads=2",
    "model.initializer_range=0.02",
]
RUN = [
    "data.eval_split=0",  # loading and the first steps are measured, not the held-out eval
    "training.logging_steps=1",
    "method.lora_dropout=0.0",
    "training.max_length=64",
    "training.report_to=[]",
    "training.save_steps=100",
    "model.dtype=float32",
]


def build_checkpoint(directory: Path) -> int:
    """Random weights in ``directory`` (safetensors), once; returns their size in bytes."""
    files = list(directory.glob("*.safetensors"))
    if not files:
        import torch

        from data import load_tokenizer
        from train.config import compose_config, load_config
        from train.model.build import build_model

        config = load_config(compose_config(ARCHITECTURE), check=False)
        tokenizer = load_tokenizer()
        model = build_model(config.model, tokenizer, dtype=torch.float32, seed=0)
        model.save_pretrained(directory)  # safetensors, sharded at transformers' 50 GB default: one file
        tokenizer.save_pretrained(directory)  # a checkpoint directory carries its tokenizer
        files = list(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes: python processes with RANK in their environment under ``accelerate launch``,
    or the launcher itself for a single process."""
    ranks = {}
    for child in [launcher, *launcher.children(recursive=True)]:
        try:
            environ, command = child.environ(), child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "-m" in command and command[command.index("-m") + 1] == "train":
            ranks[int(environ.get("RANK", 0))] = child
    return ranks


def anonymous_bytes(pid: int) -> int:
    """What the process holds itself (``RssAnon``), not the file pages it maps."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def mapped_bytes(pid: int, directory: Path) -> int:
    """The pages of files under ``directory`` (the checkpoint) this process has mapped and touched."""
    total, inside = 0, False
    prefix = str(directory.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            inside = len(fields) >= 6 and fields[5].startswith(prefix)
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


# Lines the run logs: data prepared (every process has imported everything and holds tokenizer and data;
# the weights come next), and step 0 (loading, sharding and broadcasting are done).
PLACED, STEP_ZERO = "[train][INFO] - data: ", " process(es), engine "
KEYS = ("before", "load", "held", "peak", "anon_before", "anon_load", "anon_held", "checkpoint_pages")


def measure(run: str, checkpoint: Path, work: Path, interval: float = 0.05, steps: int = 2) -> dict:
    """``run`` is ``<launch>:<method>`` (``single:<method>``: one process with twice the batch). Per rank:
    ``before`` (RSS once the data is prepared, before any weight), ``load`` (peak until step 0: reading,
    quantizing, sharding, broadcasting, with transients such as one whole tensor being sent or gathered),
    ``held`` (RSS at step 0: what the rank keeps) and ``peak`` (over the whole run, its steps included);
    the same for anonymous memory (``anon_*``); ``checkpoint_pages`` (the most of the checkpoint's pages it
    had mapped while loading); the losses (of ``steps`` steps); and the run's log."""
    launch, method = run.split(":")
    run_dir = work / run.replace(":", "-")
    where = ["-m", "train"]
    if launch != "single":
        where = ["-m", "launch", f"launch={launch}", "launch.num_processes=2", "launch.run=true"]
    batch = 2 if launch == "single" else 1  # the same global batch
    command = [
        sys.executable, *where, f"hydra.run.dir={run_dir}", f"model.path={checkpoint}", f"method={method}",
        f"training.per_device_train_batch_size={batch}", *ARCHITECTURE, *RUN, f"training.max_steps={steps}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true"}
    launcher = psutil.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    figures: dict[str, dict[int, int]] = {key: {} for key in KEYS}
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    while launcher.poll() is None:
        log = b"".join(output).decode(errors="replace")
        for rank, process in _ranks(launcher).items():
            try:
                rss = process.memory_info().rss
                anon = anonymous_bytes(process.pid)
                pages = mapped_bytes(process.pid, checkpoint) if STEP_ZERO not in log else 0
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
            if PLACED in log and rank not in figures["before"]:
                figures["before"][rank], figures["anon_before"][rank] = rss, anon
            if STEP_ZERO not in log:
                for key, value in (("load", rss), ("anon_load", anon), ("checkpoint_pages", pages)):
                    figures[key][rank] = max(figures[key].get(rank, 0), value)
            elif rank not in figures["held"]:
                figures["held"][rank], figures["anon_held"][rank] = rss, anon
            figures["peak"][rank] = max(figures["peak"].get(rank, 0), rss)
        time.sleep(interval)
    reader.join()
    log = b"".join(output).decode(errors="replace")
    if launcher.returncode != 0:
        raise RuntimeError(f"{run} exited {launcher.returncode}:\n{log[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    return {"run": run, "launch": launch, **figures, "losses": losses, "log": log}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=[
        "ddp:lora", "fsdp:lora", "zero3:lora", "single:qlora", "fsdp:qlora", "zero3:qlora"])  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None, help="where to keep the random checkpoint")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="load-memory-") as scratch:
        checkpoint = options.checkpoint or Path(scratch) / "checkpoint"
        checkpoint.mkdir(parents=True, exist_ok=True)
        size = build_checkpoint(checkpoint)
        print(f"checkpoint: {size / GIB:.2f} GiB of fp32 safetensors ({checkpoint})")
        heads = ("RSS before", "RSS load", "RSS held", "anon before", "anon load", "anon held", "ckpt pages")
        print(f"{'run':<14}{'rank':>5}" + "".join(f"{h:>13}" for h in heads) + "   losses")
        for name in options.runs:
            run = measure(name, checkpoint, Path(scratch))
            for rank in sorted(run["before"]):
                keys = ("before", "load", "held", "anon_before", "anon_load", "anon_held", "checkpoint_pages")
                figures = "".join(f"{run[k].get(rank, 0) / GIB:>9.2f} GiB" for k in keys)
                losses = " ".join(f"{loss:.6f}" for loss in run["losses"].values()) if rank == 0 else ""
                print(f"{name:<14}{rank:>5}{figures}   {losses}", flush=True)
        print(
            "load: the peak until step 0 (loading, quantizing, sharding done); held: at step 0; anon: "
            "anonymous memory (RssAnon); ckpt pages: the checkpoint's pages the rank mapped while loading; "
            f"1 x weights = {size / GIB:.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
