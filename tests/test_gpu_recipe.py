"""bench/gpu_recipe.py, the launch post's plain TRL recipe against ours (issue 14), end to end as a CPU dry
run (tiny model), so it still runs when a GPU machine is next at hand."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import REPO, bench_dry_run


@pytest.mark.slow
def test_gpu_recipe_runs_as_a_cpu_dry_run(tmp_path):
    result, report = bench_dry_run("gpu_recipe.py", out=tmp_path / "gpu_recipe.json")
    runs = {(run["setting"], run["run"]): run for run in report["runs"]}
    # the CPU default: 128 tokens a row. The 16k pair and the 131k probe run on a GPU (or when asked for):
    # the same runs on long_texts' conversations (test below)
    settings = [("128", "plain"), ("128", "ours")]
    assert list(runs) == settings
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["tokens_per_second"] > 0 and run["peak_memory_gib"] > 0, run
        assert math.isfinite(run["final_loss"]) and 0 < run["final_loss"] < 20, run
        assert run["mfu"] > 0, run
        assert run["command"] in result.stdout  # the exact command line is printed
    for setting in ("128",):
        plain, ours = runs[setting, "plain"], runs[setting, "ours"]
        assert abs(ours["trained_tokens"] - plain["trained_tokens"]) <= 0.1 * plain["trained_tokens"], setting
        assert ours["trained_tokens"] == ours["predicted_tokens"], ours  # each run's token plan holds
        assert plain["trained_tokens"] == plain["predicted_tokens"], plain
        ratio = report["ratios"][setting]
        assert ratio["tokens_per_second"] == round(ours["tokens_per_second"] / plain["tokens_per_second"], 2)
        assert ratio["peak_memory_gib"] == round(ours["peak_memory_gib"] / plain["peak_memory_gib"], 2)
    assert runs["128", "plain"]["steps"] >= 2  # so tokens/s is the steady state after the first step
    assert report["planner"]["summary"]  # the planner's answer, or n/a with its reason
    packing = report["packing_check"]  # packed sequences apart on this device's attention; the control not
    assert packing["ok"]
    assert packing["max_abs_difference"] <= packing["tolerance"] < packing["control_difference"]
    assert "| 128 | plain | ok |" in result.stdout and "128: ours / plain tokens/s" in result.stdout
    assert "planner: " in result.stdout


def test_long_conversations_are_over_the_length_in_both_formats(tokenizer, tmp_path):
    """The long settings truncate every row to the length on both sides, so both train on rows x length."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_recipe import long_texts, ours_lengths, plain_lengths, write_jsonl

    texts = long_texts(3, 3 * 256 // 2, tokenizer)
    assert len(set(texts)) == 3  # each starts at another sample
    assert plain_lengths(texts, tokenizer, 256) == [256] * 3
    path = write_jsonl(tmp_path / "long.jsonl", texts)
    assert ours_lengths(path, tokenizer, 256, tmp_path / "prepared") == [256] * 3
