"""bench/gpu_check.py, the GPU check of issue 12, end to end as a CPU dry run (tiny model), so it still runs
when a GPU machine is next at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_runs_as_a_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        # lora's path is every other run of the suite; the two the GPU check adds are QLoRA's and full's
        [sys.executable, "bench/gpu_check.py", "--methods", "qlora", "full", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # a dry run on a GPU machine too
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "CPU DRY RUN" in result.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert [run["method"] for run in report["runs"]] == ["qlora", "full"]
    for run in report["runs"]:
        assert run["planned_peak_bytes"] > 0 and run["measured_peak_bytes"] > 0, run
        assert f"| {run['method']} |" in result.stdout  # a row of the printed table
        assert any(line.startswith("placement: rank 0/1") for line in run["placement_log"]), run
    assert report["qlora_placement"]["linear4bit_devices"] == {"cpu": 14}  # 2 layers x 7 Linears
