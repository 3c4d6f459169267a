"""bench/gpu_check.py, the GPU check of issue 12, end to end as a CPU dry run (tiny model), so it still runs
when a GPU machine is next at hand."""

from __future__ import annotations

import pytest
from conftest import bench_dry_run

pytestmark = pytest.mark.slow


def test_gpu_check_runs_as_a_cpu_dry_run(tmp_path):
    # lora's path is every other run of the suite, full's is test_state_bytes'; QLoRA's adds 4-bit placement
    result, report = bench_dry_run("gpu_check.py", "--methods", "qlora", out=tmp_path / "gpu_check.json")
    assert [run["method"] for run in report["runs"]] == ["qlora"]
    for run in report["runs"]:
        assert run["planned_peak_bytes"] > 0 and run["measured_peak_bytes"] > 0, run
        assert f"| {run['method']} |" in result.stdout  # a row of the printed table
        assert any(line.startswith("placement: rank 0/1") for line in run["placement_log"]), run
    assert report["qlora_placement"]["linear4bit_devices"] == {"cpu": 14}  # 2 layers x 7 Linears
