"""bench/gpu_check.py, the GPU check of issues 12 and 20, end to end as a CPU dry run (tiny model), so it
still runs when a GPU machine is next at hand; and its Hub-kernel probe on a model that does use them."""

from __future__ import annotations

import os

import pytest
from conftest import REPO, bench_dry_run


@pytest.mark.slow
def test_gpu_check_runs_as_a_cpu_dry_run(tmp_path):
    # lora's path is every other run of the suite, full's is test_state_bytes'; QLoRA's adds 4-bit placement,
    # and the QLoRA pair under FSDP with one process and without it
    result, report = bench_dry_run("gpu_check.py", "--methods", "qlora", out=tmp_path / "gpu_check.json")
    assert report["failures"] == []
    assert [run["method"] for run in report["runs"]] == ["qlora"]
    for run in report["runs"]:
        assert run["planned_peak_bytes"] > 0 and run["measured_peak_bytes"] > 0, run
        assert f"| {run['method']} |" in result.stdout  # a row of the printed table
        assert any(line.startswith("placement: rank 0/1") for line in run["placement_log"]), run
    assert report["qlora_placement"]["linear4bit_devices"] == {"cpu": 14}  # 2 layers x 7 Linears

    # no Hub kernels in the model built as a run builds it (loaded, then after model.train()), nor in a run
    hub = report["hub_kernels"]
    assert hub["model"] == {"after_load": [], "after_train": []}
    assert set(hub["runs"]) == {"qlora", "qlora, local", "qlora, fsdp"}
    assert not any(traces["kernelized"] for traces in hub["runs"].values()), hub["runs"]

    # FSDP2 with one process: sharded, QLoRA's weights loaded by rank 0 after sharding, the same losses as
    # without FSDP (on a CPU in fp32: to the last digit, measured), and a generation under FSDP
    pair = report["fsdp_qlora"]
    assert pair["engine_fsdp"] and pair["loader_ran"], pair["fsdp_log"]
    assert pair["steps"] == {"local": [1, 2, 3], "fsdp": [1, 2, 3]}
    assert pair["relative_difference"]["loss"] <= 1e-6 and pair["relative_difference"]["grad_norm"] <= 1e-6
    assert len(set(pair["loss"]["fsdp"])) == 3  # three rows, the last through trained adapters
    assert pair["eval_loss"]["fsdp"] and pair["eval_loss"]["local"]
    [sample] = [row for row in pair["samples"]["fsdp"] if row["step"] == 3]
    assert sample["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"), sample
    assert sample["completion"], sample
    assert "| 3 | " in result.stdout and "FSDP run: placement: rank 0/1" in result.stdout


def test_the_hub_kernel_probe_sees_a_kernelized_model(tmp_path, monkeypatch):
    """What gpu_check asserts is absent, seen where it is present: a model loaded with ``use_kernels=True``,
    transformers 5's default. On a CPU its kernel mapping has no layer to swap, so nothing is fetched."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    # gpu_check pins CUDA_VISIBLE_DEVICES as it is imported: keep this process's as it is, and restore it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from gpu_check import hub_kernel_users

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert hub_kernel_users(AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=False)) == []
    assert "" in hub_kernel_users(AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=True))
