"""On one GPU, what only a GPU shows (issue 12, item 9; issue 20, item 6). Without a GPU the same flow runs on
``model=tiny`` as a CPU dry run.

    python bench/gpu_check.py [--out gpu_check.json] [--layers 4] [--steps 3] [--max-length 1024]

Every run below is started as a user starts it, from the repository root, with ``HF_HUB_OFFLINE=1`` (set
for this process and everything it starts): a run that needs the Hub fails.

1. Planner against measurement. For each method (lora, qlora, full):

    python -m train model=8b model.path=null model.num_hidden_layers=4 method=<m> training.packing=true \
        training.max_steps=3 training.max_length=1024 training.per_device_train_batch_size=1 ...
    python -m train.plan <the same overrides> device=local output=json

   and the run's own end-of-run row in metrics.jsonl (``torch.cuda.max_memory_allocated`` on a GPU; on a CPU
   the process's peak RSS, python and its libraries included, so the ratio there checks nothing), what it
   held after its first optimizer step (state_bytes/rank0.json, against the planner's parts) and its
   placement log lines. Packing fills every row to max_length, the tokens the planner counts.
2. QLoRA built in this process as a run builds it (accelerate's state first, then
``train.model.build.build_model``
   with that placement): every ``Linear4bit`` weight on ``cuda:<LOCAL_RANK>``; and no Hub kernels, after the
   load and after ``model.train()`` (where transformers kernelizes again): no model with ``use_kernels`` on,
   no layer or kernel function whose forward the ``kernels`` package swapped (``hub_kernel_users``). On CUDA
   transformers 5 would swap RMSNorm and RoPE for kernels-community's by default; the CPU has no such mapping.
   Every run's train.log is read too: a kernelized run logs the repository it takes a layer from.
3. QLoRA under FSDP with one process against the same run without FSDP, 3 steps, with the held-out split and
   one sample generation (``samples.count=1 samples.max_new_tokens=8``), both at once:

    python -m launch launch=fsdp launch.num_processes=1 launch.run=true <the qlora overrides> ...
    python -m train <the qlora overrides> ...

   ``accelerate launch`` starts FSDP through torchrun whatever the process count (accelerate 1.15,
   commands/launch.py:1399), so the one process shards with FSDP2 and the QLoRA weights load as on many GPUs:
   rank 0 reads and quantizes each tensor once the engine has sharded (train/model/quantized_loading.py; its
   log line must be there, and the placement's engine must say FSDP). Checked: the training loss of each step
   and the held-out loss agree within ``LOSS_TOLERANCE``, the gradient norm of each step within
   ``GRAD_NORM_TOLERANCE``; the FSDP run wrote its generation to samples.jsonl (generation under FSDP, a
   Linear4bit computing on a sharded 4-bit weight: bitsandbytes issue #1945 reports wrong outputs after
   ``fully_shard`` with bf16 quant storage). Whether both runs' greedy completions are the same text is
   reported, not checked: bf16 rounding can swap two near-equal logits.

Why 1e-3 of the loss. Both runs read the same random checkpoint, quantize it alike and see the same rows in
the same order (one process, seed 42); the warm-up step's learning rate is 0, so step 3 is the first loss
through trained adapters. They may differ by rounding only: FSDP2 computes in bf16 from fp32 adapter masters
(``MixedPrecisionPolicy``) as autocast does without it, and may reduce in another order. bf16 rounds a logit
by <= 2^-9 of it (~0.01 at the logits' scale here), independently per token, so the mean over the ~500
loss-bearing tokens of a 1024-token row moves by ~1e-4 of the loss or less; the tolerance is 10x that. A
larger one would check nothing on random weights: their final RMSNorm fixes the logits' spread (sigma ~1.3
at 8B widths), so even a forward that computes garbage only reshuffles which logit each token gets, moving
the mean loss by sigma * sqrt(2 / 500) ~ 0.08, 6e-3 of its ~12.6; relative 1e-2 would pass it. Small damage
(a few weights in 10^4, as #1945's NaN canonicalization) does not move a random model's loss at all: this
proves the loader and the sharded 4-bit forward compute the same model, not that every weight is exact.
The gradient norm's rounding is of the same order; 1e-2 for it.

Exit status 1 when a run fails, a 4-bit weight is elsewhere, a model or run used Hub kernels, the FSDP run
did not shard or load as above, the losses disagree, the FSDP run wrote no sample, or (GPU only) a run
measures more than 5% above its plan: a plan that says "fits" must fit. Lookups of the Hub that offline mode
turned away without failing the run (bitsandbytes asks for kernels-community's CPU 4-bit matmul at import on
CPUs with AVX512-BF16) are printed and reported, not failed.

Estimated 5 minutes on an H200 with --layers 4 (not yet measured there): 3-4 for the three methods, ~1.5 more
for the FSDP pair, which runs while this process builds its QLoRA model. CPU dry run (tiny, 128 tokens, 1
step per method; the pair 3 steps): 63 s on 2 cores for all methods, 40-60 s for ``--methods qlora``
(measured at load ~3; 2-3x that under heavier load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# One GPU: launch=local refuses a process that sees several (train/model/placement.py), so pin the first.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
METHODS = ("lora", "qlora", "full")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "kernels")
PLAN_PARTS = ("weights", "gradients", "master", "optimizer")  # the state terms state_bytes measures too
TOLERANCE = 1.05  # measured above 1.05 x planned: the planner under-counts
FSDP_STEPS = 3  # step 1 trains at learning rate 0 (warm-up), so step 3 is the first through trained adapters
SAMPLE_TOKENS = 8
LOSS_TOLERANCE = 1e-3  # relative, per step and for the held-out loss: the docstring says why
GRAD_NORM_TOLERANCE = 1e-2
# The log lines train/model/placement.py writes: where the process sits, and its host memory around the load.
PLACEMENT_LINES = re.compile(r"(placement: .*|rank \d+ loaded the model: .*)")
# ... and under FSDP, QLoRA's loading (train/model/build.py, train/model/quantized_loading.py) and the
# launch's own check.
FSDP_LINES = re.compile(r"(placement: .*|QLoRA under .*|QLoRA weights: .*|launch=\w+: \d+ process\(es\).*)")
# A run that kernelizes logs the repository each layer comes from (kernels 0.19, layer/layer.py:686, through
# the root logger), or that it could not load one (:694).
KERNELIZED = re.compile(
    r"^.*(?:Using function/layer from repo|Kernel for layer .* could not be loaded).*$", re.M
)
# What offline mode turned away: kernels' hf_hub.py:123, huggingface_hub's OfflineModeIsEnabled.
HUB_LOOKUP = re.compile(
    r"^.*(?:Hub is in offline mode|offline mode is enabled|OfflineModeIsEnabled).*$", re.M | re.IGNORECASE
)


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


def fsdp_pair_overrides(args: argparse.Namespace, on_gpu: bool) -> list[str]:
    """The QLoRA run of ``run_overrides`` for FSDP_STEPS steps, with the held-out split (the data's own) and
    one short sample generation at the end."""
    replaced = ("training.max_steps=", "data.eval_split=")
    kept = [o for o in run_overrides("qlora", args, on_gpu) if not o.startswith(replaced)]
    samples = ["samples.count=1", f"samples.max_new_tokens={SAMPLE_TOKENS}"]
    return [*kept, f"training.max_steps={FSDP_STEPS}", *samples]


def start(*argv: str, log: Path | None = None) -> subprocess.Popen:
    """``python <argv>`` from the repository root, its output piped back; with ``log``, written there instead
    (for a run that goes on while this process works: a pipe nobody reads would stall it), in a session of its
    own, so that ``stop`` ends the processes it starts too."""
    settings = {"cwd": REPO, "text": True, "env": {**os.environ, "WANDB_SILENT": "true"}}
    if log is None:
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen([sys.executable, *argv], **pipes, **settings)
    with log.open("w") as file:
        return subprocess.Popen(
            [sys.executable, *argv], stdout=file, stderr=subprocess.STDOUT, start_new_session=True, **settings
        )


def stop(process: subprocess.Popen) -> None:
    """Kill a process started with a log, and whatever it started (accelerate's torchrun, the ranks)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen, what: str, timeout: float, log: Path | None = None) -> str:
    """The process's stdout (``log``'s text, for a process started with one) once it exits 0; otherwise its
    output's tail, and exit 1."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if log is not None:
            stop(process)
        else:
            process.kill()
        stdout, stderr = process.communicate()
    output = log.read_text() if log is not None else stdout
    if process.returncode != 0:
        tail = output if log is not None else stdout + stderr
        print(f"{what} failed (exit {process.returncode}):\n{tail[-6000:]}", file=sys.stderr)
        raise SystemExit(1)
    return output


def hub_traces(log: str) -> dict[str, list[str]]:
    """A run log's traces of the Hub, each message once: layers kernelized (or tried), lookups turned away."""

    def messages(pattern: re.Pattern) -> list[str]:
        return list(dict.fromkeys(line.split(" - ", 1)[-1].strip() for line in pattern.findall(log)))

    return {"kernelized": messages(KERNELIZED), "lookups": messages(HUB_LOOKUP)}


def check_method(method: str, overrides: list[str], run_dir: Path) -> dict:
    """Train briefly and plan the same run (the planner beside the run's start, on another core), then put
    the two side by side."""
    from train.run.outputs import METRICS_FILE, read_metrics
    from train.run.state_bytes import STATE_BYTES_DIR

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
        "hub": hub_traces(log),
    }


def build_qlora(overrides: list[str]):
    """The QLoRA model as ``python -m train`` builds it (accelerate's state, then ``build_model`` with that
    placement), and the placement."""
    from data import tokenizer_for
    from train.config import compose_config, load_config
    from train.model.build import build_model, compute_dtype
    from train.model.placement import place_processes
    from train.run.trainer import training_args

    config = load_config(compose_config(overrides))
    dtype = compute_dtype(config.model.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        placement = place_processes(config.launch, training_args(config, Path(scratch), dtype))
    tokenizer = tokenizer_for(config.model)
    model = build_model(
        config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method,
        placement=placement,
    )  # fmt: skip
    return model, placement


def quantized_weight_devices(model, placement) -> dict:
    """The devices the model's 4-bit weights sit on, and the one they should."""
    import bitsandbytes as bnb

    devices = Counter(str(m.weight.device) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    expected = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return {"expected": expected, "placement": str(placement.device), "linear4bit_devices": dict(devices)}


def hub_kernel_users(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` that use transformers' Hub kernels ("" is the model itself): a model whose
    ``use_kernels`` is on (transformers' ``kernelize`` sets it, integrations/hub_kernels.py:523, whatever the
    device's mapping held), or a layer or kernel function (``_kernel_funcs``: RoPE) whose forward the
    ``kernels`` package swapped for a repository's (its ``_replace_forward``, kernels 0.19
    layer/layer.py:796, leaves the instance the ``_kernel_repo`` it came from)."""
    users = []
    for name, module in model.named_modules():
        parts = (module, *getattr(module, "_kernel_funcs", {}).values())
        if getattr(module, "use_kernels", False) is True or any("_kernel_repo" in vars(p) for p in parts):
            users.append(name)
    return users


def hub_kernels_after_load_and_train(model) -> dict[str, list[str]]:
    after_load = hub_kernel_users(model)
    model.train()  # transformers kernelizes again here when use_kernels is on (modeling_utils.py:5096)
    return {"after_load": after_load, "after_train": hub_kernel_users(model)}


def relative_difference(ours: list[float], theirs: list[float]) -> float:
    """The largest |ours - theirs| / |theirs| over the pairs; infinite when the lists differ in length or a
    value is not finite."""
    if len(ours) != len(theirs) or not ours:
        return math.inf
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if not (math.isfinite(a) and math.isfinite(b)) or (b == 0 and a != 0):
            return math.inf
        worst = max(worst, abs(a - b) / abs(b) if b else 0.0)
    return worst


def start_fsdp_pair(overrides: list[str], scratch: Path) -> dict:
    """Start the QLoRA run under FSDP with one process and the same run without FSDP, at once."""
    commands = {
        "local": ["-m", "train", *overrides],
        "fsdp": ["-m", "launch", "launch=fsdp", "launch.num_processes=1", "launch.run=true", *overrides],
    }
    runs = {}
    for name, argv in commands.items():
        run_dir, log = scratch / f"pair-{name}", scratch / f"pair-{name}.out"
        runs[name] = {
            "command": shlex.join(["python", *argv, f"hydra.run.dir={run_dir}"]),
            "run_dir": run_dir,
            "log": log,
            "process": start(*argv, f"hydra.run.dir={run_dir}", log=log),
        }
    return {"overrides": overrides, "started": time.monotonic(), "runs": runs}


def finish_fsdp_pair(pair: dict) -> dict:
    """Wait for both runs, then their losses, gradient norms, held-out losses and samples side by side."""
    from train.run.outputs import METRICS_FILE, read_metrics
    from train.run.samples import SAMPLES_FILE

    runs = pair["runs"]
    try:
        for name, run in runs.items():
            finish(run["process"], f"the QLoRA run, {name}", 900, log=run["log"])
    finally:
        for run in runs.values():
            stop(run["process"])
    seconds = time.monotonic() - pair["started"]
    series, logs, samples = {}, {}, {}
    for name, run in runs.items():
        rows = read_metrics(run["run_dir"] / METRICS_FILE)
        steps = {row["step"]: row for row in rows if "loss" in row}
        series[name] = {
            "steps": sorted(steps),
            "loss": [steps[s]["loss"] for s in sorted(steps)],
            "grad_norm": [steps[s]["grad_norm"] for s in sorted(steps)],
            "eval_loss": [row["eval_loss"] for row in rows if "eval_loss" in row][-1:],
        }
        logs[name] = (run["run_dir"] / "train.log").read_text()
        path = run["run_dir"] / SAMPLES_FILE
        samples[name] = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    local, fsdp = series["local"], series["fsdp"]
    fsdp_log = FSDP_LINES.findall(logs["fsdp"])
    placement = next((line for line in fsdp_log if line.startswith("placement: ")), "")
    launched = next((line for line in fsdp_log if line.startswith("launch=")), "")
    completions = {name: [row["completion"] for row in rows] for name, rows in samples.items()}
    return {
        "overrides": pair["overrides"],
        "commands": {name: run["command"] for name, run in runs.items()},
        "seconds": round(seconds, 1),
        "steps": {"local": local["steps"], "fsdp": fsdp["steps"]},
        **{key: {"local": local[key], "fsdp": fsdp[key]} for key in ("loss", "grad_norm", "eval_loss")},
        "relative_difference": {
            key: relative_difference(fsdp[key], local[key]) for key in ("loss", "grad_norm", "eval_loss")
        },
        "tolerance": {"loss": LOSS_TOLERANCE, "grad_norm": GRAD_NORM_TOLERANCE, "eval_loss": LOSS_TOLERANCE},
        "fsdp_log": fsdp_log,
        "engine_fsdp": "engine FSDP" in placement and "engine FSDP" in launched,
        "loader_ran": any(line.startswith("QLoRA weights: ") for line in fsdp_log),
        "samples": samples,
        "same_completions": completions["local"] == completions["fsdp"],
        "hub": {name: hub_traces(log) for name, log in logs.items()},
    }


def pair_problems(pair: dict) -> list[str]:
    """What the FSDP pair got wrong, one line each."""
    problems = []
    if not pair["engine_fsdp"]:
        problems.append("the FSDP run's placement or launch check does not say engine FSDP (see fsdp_log)")
    if not pair["loader_ran"]:
        problems.append("the FSDP run did not load QLoRA's weights after sharding (no 'QLoRA weights:' line)")
    if not pair["steps"]["fsdp"] == pair["steps"]["local"] == list(range(1, FSDP_STEPS + 1)):
        problems.append(f"the runs logged steps {pair['steps']}, not 1..{FSDP_STEPS} each")
    checked = ("loss", "grad_norm", "eval_loss")
    for key in checked:
        if not pair["relative_difference"][key] <= pair["tolerance"][key]:
            problems.append(
                f"{key} under FSDP differs from without by {pair['relative_difference'][key]:.2e} (relative; "
                f"tolerance {pair['tolerance'][key]:g}): {pair[key]['fsdp']} vs {pair[key]['local']}"
            )
    if not [row for row in pair["samples"]["fsdp"] if row["step"] == FSDP_STEPS]:
        problems.append(f"the FSDP run wrote no sample generation for step {FSDP_STEPS} to samples.jsonl")
    return problems


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


def print_pair(pair: dict) -> None:
    print(f"\nQLoRA, FSDP with one process against no FSDP (same seed, same rows), {pair['seconds']:.0f} s:")
    print(
        "| step | loss, no FSDP | loss, FSDP | relative difference | grad norm, no FSDP | grad norm, FSDP |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    loss, norm = pair["loss"], pair["grad_norm"]
    rows = zip(pair["steps"]["fsdp"], loss["local"], loss["fsdp"], norm["local"], norm["fsdp"], strict=False)
    for step, local, fsdp, local_norm, fsdp_norm in rows:
        difference = relative_difference([fsdp], [local])
        print(
            f"| {step} | {local:.6f} | {fsdp:.6f} | {difference:.1e} | {local_norm:.6f} | {fsdp_norm:.6f} |"
        )
    held_out = " ".join(f"{name} {values[0]:.6f}" for name, values in pair["eval_loss"].items() if values)
    print(f"held-out loss: {held_out}; relative difference {pair['relative_difference']['eval_loss']:.1e}")
    print("FSDP run: " + "; ".join(pair["fsdp_log"]))
    for name, rows in pair["samples"].items():
        for row in rows:
            print(f"sample, {name}, step {row['step']}: ...{row['prompt'][-60:]!r} -> {row['completion']!r}")
    print("same greedy completions:", pair["same_completions"], "(reported, not checked)")


def hub_problems(hub: dict) -> list[str]:
    """Print what the Hub check found; what fails it, one line each. Lookups that offline mode turned away
    while the run went on are printed and reported, not failed."""
    users = {when: found for when, found in (hub["model"] or {}).items() if found}
    kernelized = {run: traces["kernelized"] for run, traces in hub["runs"].items() if traces["kernelized"]}
    checked = "not built (no qlora)" if hub["model"] is None else (users or "no module uses Hub kernels")
    print(f"\nHub kernels: the QLoRA model {checked}; runs: {kernelized or 'none kernelized'}")
    for line in sorted({line for traces in hub["runs"].values() for line in traces["lookups"]}):
        print(f"NOTE: offline mode turned a Hub lookup away (the run went on): {line}")
    problems = [f"the QLoRA model uses Hub kernels: {users}"] if users else []
    return problems + ([f"runs kernelized from the Hub: {kernelized}"] if kernelized else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-width model (GPU)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (GPU 3, CPU 1)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (GPU 1024, CPU 128)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    # Before anything imports huggingface_hub (it reads it once): no run, nor this process, reaches the Hub
    os.environ["HF_HUB_OFFLINE"] = "1"
    on_gpu = torch.cuda.is_available()
    args.steps = args.steps or (3 if on_gpu else 1)
    args.max_length = args.max_length or (1024 if on_gpu else 128)
    started = time.monotonic()
    command = shlex.join(["python", *sys.argv])
    report = {"command": command, "device": device_name(), "gpu": on_gpu, "dry_run": not on_gpu,
              "versions": versions(), "runs": [], "qlora_placement": None, "hub_kernels": None,
              "fsdp_qlora": None, "seconds": None}  # fmt: skip

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
    print("HF_HUB_OFFLINE=1 for this process and every run")

    results = report["runs"]
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for method in args.methods:
            result = check_method(method, run_overrides(method, args, on_gpu), Path(scratch) / method)
            print(f"{method}: {result['seconds']:.1f} s; " + "; ".join(result["placement_log"]), flush=True)
            results.append(result)
            save()
        print_table(results, on_gpu)

        if "qlora" in args.methods:
            pair = start_fsdp_pair(fsdp_pair_overrides(args, on_gpu), Path(scratch))
            print(f"\nstarted, side by side: {pair['runs']['fsdp']['command']}", flush=True)
            started_check = time.monotonic()
            model, placement = build_qlora(run_overrides("qlora", args, on_gpu))
            qlora = report["qlora_placement"] = quantized_weight_devices(model, placement)
            report["hub_kernels"] = {"model": hub_kernels_after_load_and_train(model), "runs": {}}
            del model
            devices = qlora["linear4bit_devices"]
            where = ", ".join(f"{n} on {device}" for device, n in devices.items()) or "none"
            print(
                f"QLoRA 4-bit weights: {where} Linear4bit (expected {qlora['expected']}; placement says "
                f"{qlora['placement']}), checked in {time.monotonic() - started_check:.1f} s"
            )
            if set(qlora["linear4bit_devices"]) != {qlora["expected"]}:
                failures.append(f"4-bit weights not all on {qlora['expected']}")
            save()
            fsdp_pair = report["fsdp_qlora"] = finish_fsdp_pair(pair)
            print_pair(fsdp_pair)
            failures += pair_problems(fsdp_pair)
            save()

    hub = report["hub_kernels"] = report["hub_kernels"] or {"model": None, "runs": {}}
    hub["runs"] |= {r["method"]: r["hub"] for r in results}
    if report["fsdp_qlora"]:
        hub["runs"] |= {f"qlora, {name}": traces for name, traces in report["fsdp_qlora"]["hub"].items()}
    failures += hub_problems(hub)
    under_counted = on_gpu and any(r["ratio"] > TOLERANCE for r in results)
    if under_counted:
        failures.append(f"a run measured above {TOLERANCE:g} x its planned peak")

    report["failures"] = failures
    report["seconds"] = round(time.monotonic() - started, 1)
    save()
    print(f"total: {report['seconds']:.1f} s" + ("" if on_gpu else " (CPU dry run)"))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
