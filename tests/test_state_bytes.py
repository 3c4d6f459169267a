"""What each rank really holds under 2-process FSDP and ZeRO-3 on CPU, against the planner's per-GPU terms."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_config import composed
from test_launch import SHARDED_RUN
from test_sharded_save import FULL_RUN

from train.config import load_config
from train.plan import per_gpu_bytes
from train.run.state_bytes import state_bytes

TERMS = ("weights", "gradients", "master", "optimizer")


def test_a_single_process_counts_parameters_gradients_and_adam_moments():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(3, 8)).sum().backward()
    optimizer.step()
    assert state_bytes(model, optimizer) == {
        "weights": {"float32": 4 * (8 * 4 + 4 + 4 * 2)},
        "gradients": {"float32": 4 * 4 * 2},  # the trainable layer only
        "master": {},
        "optimizer": {"float32": 2 * 4 * 4 * 2 + 4},  # exp_avg, exp_avg_sq, and the step counter
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("launch", ["fsdp", "zero3"])
def test_each_rank_holds_what_the_planner_counts(shared_launch, launch, method):
    """After the first optimizer step of a real 2-process run, every rank's parameters, gradients, master
    weights and Adam moments are within 5% of the planner's per-GPU figures for that launch, computed
    for fp32 (the CPU's compute dtype: model.dtype=auto resolves to float32 here)."""
    # the runs test_sharded_save (full) and test_launch (lora) make: the first step's states are the same
    overrides = FULL_RUN if method == "full" else SHARDED_RUN
    run_dir, _ = shared_launch(launch, *overrides)
    config = load_config(composed(f"method={method}", f"launch={launch}", "launch.num_processes=2"))
    model = dataclasses.replace(config.model, dtype="float32")
    planned = per_gpu_bytes(
        model, config.method, launch, 2, tokens=config.training.max_length, optim=config.training.optim,
        on_gpu=False,
    )  # fmt: skip
    for rank in (0, 1):
        held = json.loads((run_dir / "state_bytes" / f"rank{rank}.json").read_text())
        assert held["step"] == 1 and held["rank"] == rank
        for term in TERMS:
            assert set(held[term]) <= {"float32"}, (rank, term, held[term])  # all fp32 on a CPU
            measured = sum(held[term].values())
            print(f"{launch} {method} rank {rank} {term}: measured {measured:,}, planned {planned[term]:,}")
            assert measured == pytest.approx(planned[term], rel=0.05), (rank, term)
