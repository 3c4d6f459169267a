"""On one GPU: the Llama 3.1 launch post's one-GPU recipe (TRL's own SFT script, 4-bit NF4 QLoRA) against ours
(``python -m train +experiment=8b_qlora_oasst_top1``) on the same data and the same number of trained tokens,
side by side (issue 14). Without a GPU the same flow runs on ``model=tiny`` in fp32 as a CPU dry run.

    python bench/gpu_recipe.py [--out gpu_recipe.json] [--layers 32] [--tokens 16384] [--long-context 16384]
        [--max-context 131072] [--memory-cap-gib 80] [--peak-tflops 989]

Stages, each printed with the seconds elapsed since the start:

1. checkpoint: an 8B-architecture checkpoint with random weights (speed and memory do not depend on the
   values), built in bf16 on the GPU, saved once as safetensors with the real Llama 3.1 tokenizer.
2. data: oasst_top1-style ChatML ``text`` records (data/samples/oasst_top1_sample.jsonl, cycled) at
   ``--max-length``; for the long settings, long conversations made of the samples' turns, over the length.
3. at ``--max-length`` (1024): plain = ``python bench/plain_trl_sft.py`` (TRL's ``sft.main`` as shipped, plus
   a record of its log and peak memory) with the launch post's arguments: 4-bit NF4, LoRA r 16 / alpha 32 /
   dropout 0.05 on q/k/v/o_proj, bf16, gradient checkpointing, flash_attention_2 when flash_attn imports
   (else sdpa), lr 2e-4, batch 1 x accumulation 4, no packing, report_to none. Ours = ``python -m train
   +experiment=8b_qlora_oasst_top1 model.path=<checkpoint> data.path=<file> data.format=oasst_top1`` with
   our defaults: no speed switch is passed, whatever conf/ turns on is what this measures.
4. the same at ``--long-context`` (16384; the CPU dry run skips it unless given); plain may run out of
   memory there, reported as OOM.
5. ours alone at ``--max-context`` (131072; the CPU dry run skips it unless given), capped at
   ``--memory-cap-gib`` (80 GiB, an H100's share: ``torch.cuda.set_per_process_memory_fraction``
   inside the run's own process), one row per step, with
   ``training.activation_offloading=true`` on a GPU (the README's long-context setting), beside the
   planner's longest-context answer (``python -m train.plan ... max_context=true``; "n/a" if it errors).

Trained tokens are the non-padding input tokens a run feeds forward and backward: transformers'
``num_input_tokens_seen`` (ours counts ``non_padding``; plain counts all, the same at its batch of 1).
Loss-bearing tokens differ by design: ours learns the assistant tokens of the Llama 3.1 chat format only,
plain every token of the ChatML text. To train on equal counts each run trains one epoch over its own prefix
of one stream of records, the prefixes chosen from both formats' token counts (TRL: the text plus EOS;
ours: ``data.prepare``), so shuffling cannot change the total; the counts measured are printed.

tokens/s is the steady state: tokens and seconds between the end of the first optimizer step and the end of
the last, from the trainer's running ``train_runtime`` rows (the first step pays kernel compilation and
allocator warm-up); for a run of one step, its whole runtime. Peak memory is
``torch.cuda.max_memory_allocated`` over the run's process, loading included (ours: the ``peak_memory_gb``
end row of metrics.jsonl; on a CPU both are the process's peak RSS, so the ratio there checks nothing).

MFU = tokens/s x F / peak, with peak ``--peak-tflops`` (989: dense bf16 of an H100/H200 SXM) and F the model
FLOPs per trained token, PaLM's convention (Chowdhery et al. 2022, appendix B) for frozen weights:
F = 4 N_frozen + 6 N_lora + 12 L h s. N_frozen counts the frozen matmul weights (every layer's q/k/v/o
and MLP, and the LM head; the embedding is a lookup): 2 FLOPs a weight forward, 2 backward for the input's
gradient, none for their own. N_lora (trainable) pays the weight gradient too. 12 L h s is attention
(QK^T and AV, forward and backward, non-causal as PaLM counts it), s = sum(l^2) / sum(l) over the run's
rows. Recomputation by gradient checkpointing is not counted (that would be hardware FLOPs). The common
6 N convention, as if every weight trained, reads 1.5x higher at short context.

Exit status 1 when a run that must succeed does not: ours at every setting, plain at ``--max-length``.
Estimated 7 minutes on one H200 with all 32 layers, not yet measured there: ~1 min for the checkpoint
(16 GB), ~40 s a process for imports, reading and quantizing (5 processes), ~10 s of training at 1024,
~40 s a run at 16k and ~90 s for the 128k row. ``--layers 16`` about halves it.
CPU dry run: ~1.5 minutes on 2 idle cores (2.5-3 under other work), nearly all of it process start-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# gpu_check pins CUDA_VISIBLE_DEVICES=0 as it is imported (launch=local refuses a process that sees several
# GPUs); the runs started here inherit it.
from gpu_check import GIB, REPO, device_name, start, versions

from train.run.outputs import METRICS_FILE, read_metrics

SAMPLE = REPO / "data" / "samples" / "oasst_top1_sample.jsonl"
DATA_FORMAT = "oasst_top1"  # conf/data/oasst_top1_sample.yaml
EXPERIMENT = "8b_qlora_oasst_top1"
PLAIN_SCRIPT = "bench/plain_trl_sft.py"
# The launch post's one-GPU recipe (Hugging Face's Llama 3.1 announcement, July 2024; our copy of its figures:
# /work/shared/reference/llama31-launch-figures.md). conf/experiment/8b_qlora_oasst_top1.yaml has the same.
LORA_RANK, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj")
PLAIN_BATCH, PLAIN_ACCUMULATION = 1, 4
PLAIN_RECIPE = [
    "--dataset_text_field", "text", "--load_in_4bit", "--bnb_4bit_quant_type", "nf4",
    "--use_peft", "--lora_r", str(LORA_RANK), "--lora_alpha", "32", "--lora_dropout", "0.05",
    "--lora_target_modules", *LORA_TARGETS, "--gradient_checkpointing", "--learning_rate", "2e-4",
    "--per_device_train_batch_size", str(PLAIN_BATCH),
    "--gradient_accumulation_steps", str(PLAIN_ACCUMULATION),
    "--packing", "false", "--report_to", "none", "--seed", "42",
    # what this benchmark reads: a log row every step, with the tokens seen and the running train_runtime
    "--logging_steps", "1", "--include_num_input_tokens_seen", "true",
]  # fmt: skip
# Ours, the reading side only (a row every step, no wandb, no held-out eval), one epoch over its file.
OURS_READING = ["training.logging_steps=1", "training.report_to=[]", "data.eval_split=0",
                "training.max_steps=-1", "training.num_train_epochs=1"]  # fmt: skip
# Ours under a memory cap: the fraction is set in the run's own process, then train's __main__ runs as
# `python -m train` runs it. argv[1] is the cap in GiB (0: none).
CAPPED_TRAIN = (
    "import runpy, sys, torch; cap = float(sys.argv.pop(1)); "
    "cap and torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / "
    "torch.cuda.get_device_properties(0).total_memory)); "
    'runpy.run_module("train", run_name="__main__", alter_sys=True)'
)
OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED")


# ── data: one stream of records per setting, a prefix of it per run ─────────────────────────────────────
def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def sample_texts() -> list[str]:
    return [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines() if line.strip()]


def long_texts(count: int, min_tokens: int, tokenizer) -> list[str]:
    """``count`` ChatML conversations of at least ``min_tokens`` tokens each (as TRL tokenizes them): the
    samples' user and assistant turns one sample after another (system turns left out: one system turn
    opens a conversation), each conversation starting at the next sample."""
    from data import load_conversations

    turns = [
        chatml([m for m in conversation if m["role"] != "system"])
        for conversation in load_conversations(SAMPLE, DATA_FORMAT)
    ]
    sizes = [len(ids) for ids in tokenizer(turns, add_special_tokens=False)["input_ids"]]
    texts = []
    for first in range(count):
        parts, size = [], 0
        for index in itertools.islice(itertools.cycle(range(len(turns))), first, None):
            if size >= min_tokens:
                break
            parts.append(turns[index])
            size += sizes[index]
        texts.append("".join(parts))
    return texts


def plain_lengths(texts: list[str], tokenizer, max_length: int) -> list[int]:
    """Tokens per record as TRL's SFTTrainer makes them of a ``text`` field: EOS appended, then truncated."""
    eos = tokenizer.eos_token
    ids = tokenizer([t if t.endswith(eos) else t + eos for t in texts])["input_ids"]
    return [min(len(row), max_length) for row in ids]


def ours_lengths(path: Path, tokenizer, max_length: int, cache_dir: Path) -> list[int]:
    """Tokens per record as our run prepares them (Llama 3.1 chat format, truncated), in file order."""
    from data import prepare_dataset

    dataset, summary = prepare_dataset(
        path, DATA_FORMAT, tokenizer, max_length=max_length, num_proc=1, cache_dir=cache_dir
    )
    records = sum(1 for line in path.read_text().splitlines() if line.strip())
    if len(dataset) != records:  # the prefixes are counted in records: every one must become a row
        raise SystemExit(f"{path}: {len(dataset)} rows prepared of {records} records\n{summary}")
    return [len(row) for row in dataset["input_ids"]]


def matched_prefixes(plain: list[int], ours: list[int], target: int) -> tuple[int, int]:
    """The number of leading records for plain (its total closest to ``target``) and for ours (its total
    closest to plain's): one epoch over each prefix trains on these totals whatever the order."""
    plain_totals = list(itertools.accumulate(plain))
    ours_totals = list(itertools.accumulate(ours))
    n_plain = 1 + min(range(len(plain_totals)), key=lambda n: abs(plain_totals[n] - target))
    goal = plain_totals[n_plain - 1]
    n_ours = 1 + min(range(len(ours_totals)), key=lambda n: abs(ours_totals[n] - goal))
    return n_plain, n_ours


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


# ── the checkpoint ───────────────────────────────────────────────────────────────────────────────────
def build_checkpoint(path: Path, model: list[str], on_gpu: bool):
    """Random weights of ``conf/model/<size>.yaml``'s architecture, made on the GPU in bf16 (seconds, where
    the CPU would take minutes for 8B) or on the CPU in fp32, saved with the Llama 3.1 tokenizer."""
    from transformers import LlamaForCausalLM

    from data import load_tokenizer
    from train.config import compose_config, load_config
    from train.model.build import compute_dtype, llama_config

    tokenizer = load_tokenizer()
    architecture = llama_config(load_config(compose_config(model)).model, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        weights = LlamaForCausalLM._from_config(architecture, dtype=compute_dtype("auto"))
    weights.save_pretrained(path)  # safetensors, 5 GB shards
    tokenizer.save_pretrained(path)
    del weights
    if on_gpu:
        torch.cuda.empty_cache()
    return architecture


# ── the runs ─────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Bench:
    """What every run of one invocation shares."""

    args: argparse.Namespace
    on_gpu: bool
    work: Path
    model: list[str]  # our model overrides, model.path included
    architecture: Any  # the checkpoint's LlamaConfig
    tokenizer: Any
    report: dict
    started: float

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"

    def progress(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {what}", flush=True)

    def save(self) -> None:  # after every run, so a call cut off at a time limit still leaves its figures
        if self.args.out:
            self.args.out.write_text(json.dumps(self.report, indent=1) + "\n")


def plain_argv(bench: Bench, data_dir: Path, run_dir: Path, max_length: int, steps: int) -> list[str]:
    from train.model.build import (
        attention_implementation,  # flash_attention_2 when flash_attn imports, else sdpa
    )

    precision = ["bfloat16", "true"] if bench.on_gpu else ["float32", "false"]
    return [
        PLAIN_SCRIPT, "--record", str(run_dir / "record.json"),
        "--model_name_or_path", str(bench.checkpoint), "--dataset_name", str(data_dir),
        *PLAIN_RECIPE, "--max_length", str(max_length),
        "--dtype", precision[0], "--bf16", precision[1],
        "--attn_implementation", attention_implementation("auto"),
        "--max_steps", str(steps), "--output_dir", str(run_dir / "output"),
    ]  # fmt: skip


def ours_argv(bench: Bench, data: Path, run_dir: Path, max_length: int, extra=(), cap_gib=0.0) -> list[str]:
    overrides = [
        f"+experiment={EXPERIMENT}", *bench.model, f"data.path={data}", f"data.format={DATA_FORMAT}",
        f"data.cache_dir={bench.work / 'prepared'}", f"training.max_length={max_length}",
        *OURS_READING, *extra, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    return ["-c", CAPPED_TRAIN, f"{cap_gib:g}", *overrides]


def run(argv: list[str], run_dir: Path, timeout: float) -> tuple[str, str]:
    """Run ``python <argv>`` from the repository root: ("ok" | "OOM" | "failed", its output)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    process = start(*argv)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout:.0f} s)"
    output = stdout + stderr
    (run_dir / "output.log").write_text(output)
    if process.returncode == 0:
        return "ok", output
    return ("OOM" if OUT_OF_MEMORY.search(output) else "failed"), output


def speed(rows: list[dict]) -> dict:
    """Trained tokens, steady-state tokens/s and the last loss from a trainer's log rows."""
    steps = sorted((r for r in rows if "loss" in r and "train_runtime" in r), key=lambda r: r["step"])
    first, last = steps[0], steps[-1]
    if len(steps) > 1:
        seconds = last["train_runtime"] - first["train_runtime"]
        per_second = (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / seconds
    else:
        per_second = last["num_input_tokens_seen"] / last["train_runtime"]
    return {
        "trained_tokens": max(r.get("num_input_tokens_seen", 0) for r in rows),
        "steps": last["step"],
        "tokens_per_second": round(per_second, 1),
        "final_loss": last["loss"],
    }


def plain_result(run_dir: Path) -> dict:
    record = json.loads((run_dir / "record.json").read_text())
    return {**speed(record["log_history"]), "peak_memory_gib": record["peak_memory_bytes"] / GIB}


def ours_result(run_dir: Path) -> dict:
    rows = read_metrics(run_dir / METRICS_FILE)
    peak = next(row["peak_memory_gb"] for row in reversed(rows) if "peak_memory_gb" in row)  # GiB
    return {**speed(rows), "peak_memory_gib": peak}


def measure(
    bench: Bench, name: str, setting: str, argv: list[str], run_dir: Path, lengths: list[int]
) -> dict:
    """One run, read back: its figures, or its status (OOM, failed) and the end of its output."""
    command_line = shlex.join(["python", *argv])
    bench.progress(f"{setting}: {name}, {len(lengths)} records, {sum(lengths):,} tokens planned")
    print("  " + command_line, flush=True)
    began = time.monotonic()
    status, output = run(argv, run_dir, bench.args.timeout)
    seconds = round(time.monotonic() - began, 1)
    result = {"setting": setting, "run": name, "status": status, "seconds": seconds, "records": len(lengths),
              "predicted_tokens": sum(lengths), "command": command_line}  # fmt: skip
    if status == "ok":
        result.update(plain_result(run_dir) if name == "plain" else ours_result(run_dir))
        s = attention_length(lengths)
        result["attention_length"] = round(s, 1)
        result["flops_per_token"] = flops_per_token(bench.architecture, s)
        result["mfu"] = (
            result["tokens_per_second"] * result["flops_per_token"] / (bench.args.peak_tflops * 1e12)
        )
    else:
        result["output_tail"] = output[-3000:]
        print(f"{setting} {name}: {status}; the end of its output:\n{output[-3000:]}", file=sys.stderr)
    bench.report["runs"].append(result)
    bench.report["commands"].append(command_line)
    bench.save()
    bench.progress(f"{setting}: {name} {status} in {result['seconds']:.0f} s")
    return result


def side_by_side(bench: Bench, max_length: int, texts: list[str], target: int, plain_must: bool) -> list[str]:
    """Plain, then ours, each one epoch over its prefix of ``texts`` (about ``target`` tokens); the runs
    that failed and had to succeed."""
    setting = str(max_length)
    stream = write_jsonl(bench.work / setting / "stream.jsonl", texts)
    plain = plain_lengths(texts, bench.tokenizer, max_length)
    ours = ours_lengths(stream, bench.tokenizer, max_length, bench.work / "prepared")
    n_plain, n_ours = matched_prefixes(plain, ours, target)
    plain_data = write_jsonl(bench.work / setting / "plain" / "train.jsonl", texts[:n_plain]).parent
    ours_data = write_jsonl(bench.work / setting / "ours.jsonl", texts[:n_ours])
    steps = math.ceil(n_plain / (PLAIN_BATCH * PLAIN_ACCUMULATION))
    plain_dir, ours_dir = bench.work / setting / "plain-run", bench.work / setting / "ours-run"
    plain_run = measure(bench, "plain", setting, plain_argv(bench, plain_data, plain_dir, max_length, steps),
                        plain_dir, plain[:n_plain])  # fmt: skip
    ours_run = measure(bench, "ours", setting, ours_argv(bench, ours_data, ours_dir, max_length), ours_dir,
                       ours[:n_ours])  # fmt: skip
    if plain_run["status"] == ours_run["status"] == "ok":
        bench.report["ratios"][setting] = {
            key: round(ours_run[key] / plain_run[key], 2)
            for key in ("tokens_per_second", "peak_memory_gib", "trained_tokens")
        }
        bench.save()
    return [f"{setting} {r['run']}: {r['status']}" for r in (plain_run, ours_run)
            if r["status"] != "ok" and (plain_must or r is ours_run)]  # fmt: skip


def max_context_probe(bench: Bench, cap_gib: float) -> dict:
    """Ours alone at ``--max-context`` under ``cap_gib`` (0: none), one row a step."""
    max_length, rows = bench.args.max_context, bench.args.max_context_rows
    setting = f"{max_length} capped" if cap_gib else str(max_length)
    texts = long_texts(rows, 3 * max_length // 2, bench.tokenizer)
    path = write_jsonl(bench.work / "max" / "ours.jsonl", texts)
    lengths = ours_lengths(path, bench.tokenizer, max_length, bench.work / "prepared")
    run_dir = bench.work / "max" / "ours-run"
    extra = ["training.gradient_accumulation_steps=1"]
    if bench.on_gpu:  # the documented long-context setting (README); TRL's offloading needs CUDA streams
        extra.append("training.activation_offloading=true")
    argv = ours_argv(bench, path, run_dir, max_length, extra, cap_gib)
    return measure(bench, "ours", setting, argv, run_dir, lengths)


# ── packed sequences apart, on this device's attention ───────────────────────────────────────────────
def packing_check(on_gpu: bool) -> dict:
    """Ours packs on a GPU (train/model/fast_path.py): two sequences in one row, told apart by
    ``position_ids`` restarting at 0, must give each the logits it has alone, with the attention that runs
    here (FlashAttention-2 varlen or sdpa's block mask; tests/test_packing.py checks it on a CPU). The tiny
    architecture with the real vocabulary, in the run's dtype; the control (no position restart) must
    differ, or the check could not fail."""
    from data import load_tokenizer
    from train.config import compose_config, load_config
    from train.model.build import attention_implementation, build_model, compute_dtype

    config = load_config(compose_config(["model=tiny"]), check=False)
    dtype = compute_dtype(config.model.dtype)
    model = build_model(config.model, load_tokenizer(), dtype=dtype, seed=0)
    model = model.to("cuda" if on_gpu else "cpu").eval()
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, 128_000, (n,), generator=generator) for n in (48, 80))
    ids = torch.cat([first, second])[None].to(model.device)
    positions = torch.cat([torch.arange(48), torch.arange(80)])[None].to(model.device)
    with torch.no_grad():  # no KV cache, as in training: transformers looks for packing only then
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 48:].float()
        alone = model(input_ids=ids[:, 48:], use_cache=False).logits[0].float()
        causal = model(input_ids=ids, use_cache=False).logits[0, 48:].float()
    scale = alone.abs().max().item()
    difference, control = (packed - alone).abs().max().item(), (causal - alone).abs().max().item()
    tolerance = 0.02 * scale if dtype == torch.bfloat16 else 1e-4 * scale
    return {
        "attention": attention_implementation(config.model.attn_implementation), "dtype": str(dtype),
        "max_abs_difference": difference, "control_difference": control, "tolerance": tolerance,
        "ok": difference <= tolerance < control,
    }  # fmt: skip


# ── model FLOPs ──────────────────────────────────────────────────────────────────────────────────────
def flops_per_token(config, attention_length: float) -> float:
    """F = 4 N_frozen + 6 N_lora + 12 L h s (the module docstring says why)."""
    h, layers, kv = config.hidden_size, config.num_hidden_layers, config.num_key_value_heads * config.head_dim
    frozen = layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size) + h * config.vocab_size
    lora = layers * LORA_RANK * (2 * (h + h) + 2 * (h + kv))  # q, o: h -> h; k, v: h -> kv
    return 4 * frozen + 6 * lora + 12 * layers * h * attention_length


def attention_length(lengths: list[int]) -> float:
    """s of the attention term: the mean row length, each row weighted by its tokens (attention ~ l^2)."""
    return sum(n * n for n in lengths) / sum(lengths)


# ── the planner ──────────────────────────────────────────────────────────────────────────────────────
def planner_answer(planner: subprocess.Popen, command: str, model_name: str) -> dict:
    """The planner's longest context for ``model_name`` with QLoRA (its ``max_context=true`` table has a row
    per size x method: as configured, and with activation offloading), or n/a and why."""
    try:
        stdout, stderr = planner.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        planner.kill()
        stdout, stderr = planner.communicate()
    answer = {"command": command, "exit": planner.returncode}
    if planner.returncode != 0:
        return {**answer, "summary": f"n/a ({(stderr.strip().splitlines() or ['no output'])[-1]})"}
    try:
        table = json.loads(stdout)
        row = next(r for r in table["rows"] if (r["model"], r["method"]) == (model_name, "qlora"))
    except (json.JSONDecodeError, KeyError, TypeError):
        return {**answer, "summary": "n/a (its answer is not the JSON table this reads)", "output": stdout}
    except StopIteration:
        return {**answer, "summary": f"n/a (no row for model={model_name} method=qlora)"}
    offloaded = row.get("max_context_offloaded")
    summary = (
        f"model={model_name} method=qlora: longest context {row['max_context']:,} tokens on {table['device']}"
        + (f", {offloaded:,} with activation offloading" if offloaded else "")
    )
    return {**answer, "device": table["device"], "row": row, "max_context": row["max_context"],
            "summary": summary}  # fmt: skip


# ── the report ───────────────────────────────────────────────────────────────────────────────────────
def print_table(report: dict) -> None:
    print(
        f"\nMFU: against {report['peak_tflops']:g} TFLOP/s (dense bf16), F = 4 N_frozen + 6 N_lora + 12 L h s"
    )
    print("| setting | run | status | trained tokens | steps | tokens/s | peak GiB | final loss | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        if r["status"] != "ok":
            planned = f"({r['predicted_tokens']:,} planned)"
            print(f"| {r['setting']} | {r['run']} | {r['status']} | {planned} | | | | | |")
            continue
        print(
            f"| {r['setting']} | {r['run']} | ok | {r['trained_tokens']:,} | {r['steps']} "
            f"| {r['tokens_per_second']:,.1f} | {r['peak_memory_gib']:.2f} | {r['final_loss']:.3f} "
            f"| {100 * r['mfu']:.3g}% |"
        )
    for setting, ratio in report["ratios"].items():
        print(
            f"{setting}: ours / plain tokens/s {ratio['tokens_per_second']}, peak memory "
            f"{ratio['peak_memory_gib']}, trained tokens {ratio['trained_tokens']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    option = parser.add_argument
    option("--layers", type=int, help="decoder layers (default: the model's, 32 for 8B; 2 for tiny on CPU)")
    option("--max-length", type=int, help="the first setting's length (GPU 1024, CPU 128)")
    option("--tokens", type=int, help="trained tokens at --max-length (GPU 16384, CPU 1024)")
    option("--long-context", type=int, help="the second length (GPU 16384; CPU: skipped unless set)")
    option("--long-rows", type=int, help="rows at --long-context (GPU 8, CPU 4): 2 optimizer steps, or 1")
    option(
        "--max-context", type=int, help="ours' longest-context probe (GPU 131072; CPU: skipped unless set)"
    )
    option("--max-context-rows", type=int, default=1, help="its rows, one a step")
    option("--memory-cap-gib", type=float, default=80.0, help="the probe's cap, GPU only (0: none)")
    option("--peak-tflops", type=float, default=989.0, help="MFU's peak: dense bf16 of an H100/H200 SXM")
    option("--timeout", type=float, default=600.0, help="seconds a run may take")
    option("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    for name, gpu, cpu in [("max_length", 1024, 128), ("tokens", 16384, 1024), ("long_context", 16384, 0),
                           ("long_rows", 8, 4), ("max_context", 131072, 0)]:  # fmt: skip
        setattr(args, name, getattr(args, name) or (gpu if on_gpu else cpu))
    cap = args.memory_cap_gib if on_gpu else 0.0
    model = ["model=8b" if on_gpu else "model=tiny"]
    if args.layers:
        model.append(f"model.num_hidden_layers={args.layers}")

    started = time.monotonic()
    command = shlex.join(["python", *sys.argv])
    report = {"command": command, "device": device_name(), "gpu": on_gpu, "dry_run": not on_gpu,
              "versions": versions(), "peak_tflops": args.peak_tflops, "memory_cap_gib": cap or None,
              "model": None, "runs": [], "ratios": {}, "planner": None, "packing_check": None, "commands": [],
              "seconds": None}  # fmt: skip
    print("command:", command)
    print("device:", report["device"])
    print("versions:", ", ".join(f"{name} {v}" for name, v in report["versions"].items()))
    if not on_gpu:
        print("CPU DRY RUN (no CUDA GPU): model=tiny in fp32, tiny budgets; peak = the process's RSS, no cap")

    # The planner answers on the CPU meanwhile, for the recipe and model the probe trains.
    planner_argv = ["-m", "train.plan", f"+experiment={EXPERIMENT}", *model, "max_context=true",
                    f"gpu_memory={args.memory_cap_gib:g}GB", "output=json"]  # fmt: skip
    planner = start(*planner_argv)

    with tempfile.TemporaryDirectory(prefix="gpu-recipe-") as scratch:
        work = Path(scratch)
        print(f"[{0.0:6.1f} s] checkpoint: random weights, {' '.join(model)}", flush=True)
        checkpoint = work / "checkpoint"
        architecture = build_checkpoint(checkpoint, model, on_gpu)
        from data import load_tokenizer

        bench = Bench(args, on_gpu, work, [*model, f"model.path={checkpoint}"], architecture,
                      load_tokenizer(checkpoint), report, started)  # fmt: skip
        report["model"] = {"overrides": model, "layers": architecture.num_hidden_layers,
                           "hidden": architecture.hidden_size, "dtype": str(architecture.dtype)}  # fmt: skip
        bench.progress(f"checkpoint: {architecture.num_hidden_layers} layers saved")

        # at --max-length: the samples cycled, enough for the token budget in either format
        texts = sample_texts()
        average = sum(plain_lengths(texts, bench.tokenizer, args.max_length)) / len(texts)
        stream = [texts[i % len(texts)] for i in range(math.ceil(1.5 * args.tokens / average) + len(texts))]
        failed = side_by_side(bench, args.max_length, stream, args.tokens, plain_must=True)

        packing = report["packing_check"] = packing_check(on_gpu)
        bench.progress(
            f"packing check ({packing['attention']}, {packing['dtype']}): packed vs alone max |diff| "
            f"{packing['max_abs_difference']:.3g} (tolerance {packing['tolerance']:.3g}; without position "
            f"restarts {packing['control_difference']:.3g}): {'ok' if packing['ok'] else 'FAILED'}"
        )
        if not packing["ok"]:
            failed.append("packing check: packed sequences see each other")

        # at --long-context: every row over the length in both formats, so both truncate it to the length
        # (skipped in the CPU dry run unless asked for: the same code as above, on long_texts, which the
        # probe below runs too)
        if args.long_context:
            bench.progress(f"{args.long_context}: {args.long_rows} conversations over the length")
            stream = long_texts(args.long_rows + 2, 3 * args.long_context // 2, bench.tokenizer)
            target = args.long_rows * args.long_context
            failed += side_by_side(bench, args.long_context, stream, target, plain_must=False)

        # ours alone at --max-context, under the cap (skipped in the CPU dry run unless asked for)
        probe = max_context_probe(bench, cap) if args.max_context else {"status": "skipped"}
        if probe["status"] not in ("ok", "skipped"):
            failed.append(f"{probe['setting']} ours: {probe['status']}")

    report["planner"] = planner_answer(planner, shlex.join(["python", *planner_argv]), model[0].split("=")[1])
    print_table(report)
    if args.max_context:
        fit = "fits" if probe["status"] == "ok" else probe["status"]
        peak = f", peak {probe['peak_memory_gib']:.2f} GiB" if probe["status"] == "ok" else ""
        print(f"longest context, ours: {args.max_context:,} tokens {fit}"
              + (f" under a {cap:g} GiB cap" if cap else " (no cap on CPU)") + peak)  # fmt: skip
    print(f"planner: {report['planner']['summary']}")
    print("\ncommands run:")
    for line in [report["planner"]["command"], *report["commands"]]:
        print("  " + line)
    report["seconds"] = round(time.monotonic() - started, 1)
    bench.save()
    print(f"total: {report['seconds']:.1f} s" + ("" if on_gpu else " (CPU dry run)"))
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
