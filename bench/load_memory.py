"""Host memory while 2 processes load one checkpoint: DDP (every process reads it) against FSDP (local
rank 0 reads, the others get its broadcast) and DeepSpeed ZeRO-3 (zero.Init partitions while reading).

Builds a random-weight Llama-3.1-architecture checkpoint once (fp32 safetensors, 1.8 GiB: hidden 1024,
16 layers, the real 128,256 vocabulary), then for each launch runs

    python -m launch launch=<ddp|fsdp|zero3> launch.num_processes=2 launch.run=true \
        model.path=<checkpoint> method=lora training.max_steps=1 ...

and samples every rank's resident memory (RSS) while it loads and takes one step. Printed side by side:
each rank's peak RSS, and rank 1's peak against the checkpoint's size. A process holds ~0.9 GiB before
any weight (python, torch, transformers, TRL); DDP's rank 1 adds a whole copy of the weights on top.

    python bench/load_memory.py [--launches ddp fsdp zero3] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
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
# The checkpoint's architecture: a Llama 3.1 shape (vocabulary, GQA, rope) whose fp32 weights pass 1 GB, so
# a copy per process is plainly visible against the ~0.9 GiB a process holds without weights. The 128,256
# vocabulary makes the embedding and LM head 0.5 GB each, 27% of it (2% in 8B, 1.5% in 70B): a rank that
# gathers or receives one whole tensor at a time shows that transient on top of its shard.
ARCHITECTURE = [
    "model.hidden_size=1024",
    "model.intermediate_size=3584",
    "model.num_hidden_layers=16",
    "model.num_attention_heads=8",
    "model.num_key_value_heads=2",
    "model.initializer_range=0.02",
]
RUN = [
    "data.eval_split=0",  # loading and the first steps are measured, not the held-out eval
    "method=lora",
    "training.max_steps=1",
    "training.max_length=64",
    "training.per_device_train_batch_size=1",
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
        from train.model import build_model

        config = load_config(compose_config(ARCHITECTURE), check=False)
        tokenizer = load_tokenizer()
        model = build_model(config.model, tokenizer, dtype=torch.float32, seed=0)
        model.save_pretrained(directory)  # safetensors, sharded at transformers' 50 GB default: one file
        tokenizer.save_pretrained(directory)  # a checkpoint directory carries its tokenizer
        files = list(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes under ``accelerate launch``: python processes with RANK in their environment."""
    ranks = {}
    for child in launcher.children(recursive=True):
        try:
            environ, command = child.environ(), child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "RANK" in environ and "-m" in command:
            ranks[int(environ["RANK"])] = child
    return ranks


# Lines the run logs: data prepared (every process has imported everything and holds tokenizer and data;
# the weights come next), and step 0 (loading, sharding and broadcasting are done).
PLACED, STEP_ZERO = "[train][INFO] - data: ", ": 2 process(es), engine "


def measure(launch: str, checkpoint: Path, work: Path, interval: float = 0.05) -> dict:
    """Run ``launch`` with 2 processes on ``checkpoint``. Per rank: ``before`` (RSS once the data is
    prepared, before any weight), ``load`` (peak until step 0: reading, sharding, broadcasting, with
    transients such as one whole tensor being broadcast or gathered), ``held`` (RSS at step 0: what the
    rank keeps) and ``peak`` (over the whole run, one LoRA step included); and the run's log."""
    run_dir = work / launch
    command = [
        sys.executable, "-m", "launch", f"launch={launch}", "launch.num_processes=2", "launch.run=true",
        f"hydra.run.dir={run_dir}", f"model.path={checkpoint}", *ARCHITECTURE, *RUN,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true"}
    launcher = psutil.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    before: dict[int, int] = {}
    load: dict[int, int] = {}
    held: dict[int, int] = {}
    peak: dict[int, int] = {}
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    while launcher.poll() is None:
        log = b"".join(output).decode(errors="replace")
        for rank, process in _ranks(launcher).items():
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            if PLACED in log and rank not in before:
                before[rank] = rss
            if STEP_ZERO not in log:
                load[rank] = max(load.get(rank, 0), rss)
            elif rank not in held:
                held[rank] = rss
            peak[rank] = max(peak.get(rank, 0), rss)
        time.sleep(interval)
    reader.join()
    log = b"".join(output).decode(errors="replace")
    if launcher.returncode != 0:
        raise RuntimeError(f"launch={launch} exited {launcher.returncode}:\n{log[-4000:]}")
    return {"launch": launch, "before": before, "load": load, "held": held, "peak": peak, "log": log}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", nargs="+", default=["ddp", "fsdp", "zero3"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="where to keep the random checkpoint")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="load-memory-") as scratch:
        checkpoint = options.checkpoint or Path(scratch) / "checkpoint"
        checkpoint.mkdir(parents=True, exist_ok=True)
        size = build_checkpoint(checkpoint)
        print(f"checkpoint: {size / GIB:.2f} GiB of fp32 safetensors ({checkpoint})")
        print(f"{'':12}{'before':>10}{'loading: peak':>20}{'step 0: held':>20}{'run peak':>10}")
        print(
            f"{'launch':<7}{'rank':>5}{'RSS':>10}{'RSS':>10}{'added':>10}{'RSS':>10}{'added':>10}{'RSS':>10}"
        )
        for launch in options.launches:
            run = measure(launch, checkpoint, Path(scratch))
            for rank in (0, 1):
                figures = [run[k][rank] for k in ("before", "load")]
                figures += [run["load"][rank] - run["before"][rank], run["held"][rank]]
                figures += [run["held"][rank] - run["before"][rank], run["peak"][rank]]
                print(f"{launch:<7}{rank:>5}" + "".join(f"{f / GIB:>6.2f} GiB" for f in figures), flush=True)
        print(
            "added: above 'before' (RSS once the data is prepared, before any weight); 1 x weights = "
            f"{size / GIB:.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
