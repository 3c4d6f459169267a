"""On one GPU: the planner's per-GPU peak against what a real run measures, for LoRA, QLoRA and full
fine-tuning of an 8B-width model (a few layers, random weights), and where QLoRA's 4-bit weights land
(issue 12, item 9). Without a GPU the same flow runs on ``model=tiny`` as a CPU dry run.

    python bench/gpu_check.py [--out gpu_check.json] [--layers 4] [--steps 3] [--max-length 1024]

For each method it runs, as a user does, from the repository root:

    python -m train model=8b model.path=null model.num_hidden_layers=4 method=<m> training.packing=true \
        training.max_steps=3 training.max_length=1024 training.per_device_train_batch_size=1 ...
    python -m train.plan <the same overrides> device=local output=json

and reads the run's own end-of-run row in metrics.jsonl (``torch.cuda.max_memory_allocated`` on a GPU; on
a CPU the process's peak RSS, python and its libraries included, so the ratio there checks nothing), what
it held after its first optimizer step (state_bytes/rank0.json, against the planner's parts) and its
placement log lines. Packing fills every row to max_length, the tokens the planner counts. Then it builds
the QLoRA model in this process as a run does (accelerate's state first, then ``train.model.build_model``
with that placement) and checks that every ``Linear4bit`` weight is on ``cuda:<LOCAL_RANK>``.

Exit status 1 when a run fails, a 4-bit weight is elsewhere, or (GPU only) a run measures more than 5%
above its plan: a plan that says "fits" must fit. Estimated 3-4 minutes on an H200 with --layers 4
(not yet measured there); 1.5-4 minutes as a CPU dry run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# One GPU: launch=local refuses a process that sees several (train/placement.py), so pin the first.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import torch  # noqa: E402

from train.outputs import METRICS_FILE, read_metrics  # noqa: E402
from train.state_bytes import STATE_BYTES_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
METHODS = ("lora", "qlora", "full")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")
PLAN_PARTS = ("weights", "gradients", "master", "optimizer")  # the state terms state_bytes measures too
TOLERANCE = 1.05  # measured above 1.05 x planned: the planner under-counts
# The log lines train/placement.py writes: where the process sits, and its host memory around the load.
PLACEMENT_LINES = re.compile(r"(placement: .*|rank \d+ loaded the model: .*)")


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def device_name() -> str:
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return f"{properties.name} ({properties.total_memory / GIB:.1f} GiB)"
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "CPU",
    )  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores (no CUDA GPU)"


def run_overrides(method: str, args: argparse.Namespace, on_gpu: bool) -> list[str]:
    """The overrides of one method's run: 8B widths with ``args.layers`` layers on a GPU, tiny on a CPU."""
    model = ["model=8b", "model.path=null", f"model.num_hidden_layers={args.layers}"] if on_gpu else []
    return [
        *(model or ["model=tiny"]),
        f"method={method}",
        f"training.max_steps={args.steps}",
        f"training.max_length={args.max_length}",
        "training.per_device_train_batch_size=1",
        "training.packing=true",
        "training.logging_steps=1",
        "training.report_to=[]",
        "data.eval_split=0",  # training memory and speed are measured, not the held-out eval
    ]


def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )  # fmt: skip


def finish(process: subprocess.Popen, what: str, timeout: float) -> str:
    """The process's stdout once it exits 0; otherwise its output's tail, and exit 1."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    if process.returncode != 0:
        print(f"{what} failed (exit {process.returncode}):\n{(stdout + stderr)[-6000:]}", file=sys.stderr)
        raise SystemExit(1)
    return stdout


def check_method(method: str, overrides: list[str], run_dir: Path) -> dict:
    """Train briefly and plan the same run (the planner beside the run's start, on another core), then put
    the two side by side."""
    planned = start("-m", "train.plan", *overrides, "device=local", "output=json")
    started = time.monotonic()
    trained = start("-m", "train", *overrides, f"hydra.run.dir={run_dir}")
    finish(trained, f"python -m train method={method}", 600)
    seconds = time.monotonic() - started
    plan = json.loads(finish(planned, f"python -m train.plan method={method}", 300))
    rows = read_metrics(run_dir / METRICS_FILE)
    peak_gib = next(row["peak_memory_gb"] for row in reversed(rows) if "peak_memory_gb" in row)  # GiB
    steps = max(row["step"] for row in rows)
    tokens = max((row.get("num_input_tokens_seen", 0) for row in rows), default=0)
    held = json.loads((run_dir / STATE_BYTES_DIR / "rank0.json").read_text())
    log = (run_dir / "train.log").read_text()
    return {
        "method": method,
        "overrides": overrides,
        "seconds": round(seconds, 1),
        "tokens_per_step": round(tokens / steps) if steps else 0,
        "planned_peak_bytes": plan["peak_bytes_per_gpu"],
        "measured_peak_bytes": int(peak_gib * GIB),
        "ratio": round(peak_gib * GIB / plan["peak_bytes_per_gpu"], 3),
        "planned_parts": {part: plan["per_gpu_bytes"].get(part, 0) for part in PLAN_PARTS},
        "measured_parts": {part: sum(held.get(part, {}).values()) for part in PLAN_PARTS},
        "placement_log": PLACEMENT_LINES.findall(log),
    }


def quantized_weight_devices(overrides: list[str]) -> dict:
    """Build the QLoRA model as ``python -m train`` does (accelerate's state, then ``build_model`` with that
    placement) and count the devices its 4-bit weights sit on."""
    import bitsandbytes as bnb

    from data import load_tokenizer
    from train.config import compose_config, load_config
    from train.model import build_model, compute_dtype
    from train.placement import place_processes
    from train.trainer import training_args

    config = load_config(compose_config(overrides))
    dtype = compute_dtype(config.model.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        placement = place_processes(config.launch, training_args(config, Path(scratch), dtype))
    tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.path)
    model = build_model(
        config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method,
        placement=placement,
    )  # fmt: skip
    devices = Counter(str(m.weight.device) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    expected = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return {"expected": expected, "placement": str(placement.device), "linear4bit_devices": dict(devices)}


def print_table(results: list[dict], on_gpu: bool) -> None:
    print("\n| method | run s | tokens/step | planned peak GiB | measured peak GiB | measured / planned |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        flag = " (above plan)" if on_gpu and r["ratio"] > TOLERANCE else ""
        planned, measured = r["planned_peak_bytes"] / GIB, r["measured_peak_bytes"] / GIB
        print(
            f"| {r['method']} | {r['seconds']:.0f} | {r['tokens_per_step']} | {planned:.3f} | {measured:.3f} "
            f"| {r['ratio']:.2f}{flag} |"
        )
    print("\nState after the first optimizer step, GiB, measured / planned (state_bytes/rank0.json vs plan):")
    print("| method | " + " | ".join(PLAN_PARTS) + " |")
    print("|---|" + "---:|" * len(PLAN_PARTS))
    for r in results:
        measured, planned = r["measured_parts"], r["planned_parts"]
        cells = (f"{measured[part] / GIB:.3f} / {planned[part] / GIB:.3f}" for part in PLAN_PARTS)
        print(f"| {r['method']} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-width model (GPU)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (GPU 3, CPU 1)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (GPU 1024, CPU 128)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    args.steps = args.steps or (3 if on_gpu else 1)
    args.max_length = args.max_length or (1024 if on_gpu else 128)
    started = time.monotonic()
    command = shlex.join(["python", *sys.argv])
    report = {"command": command, "device": device_name(), "gpu": on_gpu, "dry_run": not on_gpu,
              "versions": versions(), "runs": [], "qlora_placement": None, "seconds": None}  # fmt: skip

    def save() -> None:  # after every step, so a run cut off at a time limit still leaves its figures
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")

    print("command:", command)
    print("device:", report["device"])
    print("versions:", ", ".join(f"{name} {v}" for name, v in report["versions"].items()))
    if on_gpu:
        print(f"GPU check: 8B widths, {args.layers} layers, random weights, {args.max_length} tokens x 1 row")
    else:
        print("CPU DRY RUN (no CUDA GPU): model=tiny in fp32; measured = the process's peak RSS, not a GPU's")

    results = report["runs"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for method in args.methods:
            result = check_method(method, run_overrides(method, args, on_gpu), Path(scratch) / method)
            print(f"{method}: {result['seconds']:.1f} s; " + "; ".join(result["placement_log"]), flush=True)
            results.append(result)
            save()
    print_table(results, on_gpu)

    qlora = None
    if "qlora" in args.methods:
        started_check = time.monotonic()
        qlora = report["qlora_placement"] = quantized_weight_devices(run_overrides("qlora", args, on_gpu))
        where = ", ".join(f"{n} on {device}" for device, n in qlora["linear4bit_devices"].items()) or "none"
        print(
            f"\nQLoRA 4-bit weights: {where} Linear4bit (expected {qlora['expected']}; placement says "
            f"{qlora['placement']}), checked in {time.monotonic() - started_check:.1f} s"
        )
    report["seconds"] = round(time.monotonic() - started, 1)
    save()
    print(f"total: {report['seconds']:.1f} s" + ("" if on_gpu else " (CPU dry run)"))

    misplaced = qlora is not None and set(qlora["linear4bit_devices"]) != {qlora["expected"]}
    under_counted = on_gpu and any(r["ratio"] > TOLERANCE for r in results)
    if misplaced:
        print(f"FAILED: 4-bit weights not all on {qlora['expected']}", file=sys.stderr)
    if under_counted:
        print(f"FAILED: a run measured above {TOLERANCE:g} x its planned peak", file=sys.stderr)
    return 1 if misplaced or under_counted else 0


if __name__ == "__main__":
    sys.exit(main())
