"""A real two-node Slurm cluster on this host (launch/slurm/local_cluster.sh): start, jobs, signals, stop.

    .venv/bin/pytest -q tests/test_slurm_cluster.py

The first run installs Debian's slurmctld, slurmd, slurm-client and munge (root and apt-get needed).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def free_ports(count: int) -> int:
    """A base port with ``count`` consecutive free ports, so a cluster started by hand is not disturbed."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def cluster(command: str, state_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir)}
    return subprocess.run(
        ["bash", str(CLUSTER), command], env=env, capture_output=True, text=True, timeout=timeout
    )


def run(args: list[str], env: dict[str, str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def cwd_in(process: Path, directory: Path) -> bool:
    try:
        return Path(os.readlink(process / "cwd")).is_relative_to(directory)
    except OSError:  # gone meanwhile, or not ours to read
        return False


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The running cluster's state directory and the environment its clients need (from ``env.sh``)."""
    if shutil.which("slurmctld") is None and (shutil.which("apt-get") is None or os.geteuid() != 0):
        pytest.skip("Slurm is not installed and cannot be: installing it needs root and apt-get")
    state_dir = tmp_path_factory.mktemp("slurm")
    port = free_ports(3)
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir), "SLURM_LOCAL_PORT": str(port)}
    try:
        started = subprocess.run(
            ["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=180
        )
        assert started.returncode == 0, f"local_cluster.sh start failed:\n{started.stdout}{started.stderr}"
        assert f"export SLURM_CONF={state_dir}/slurm.conf" in started.stdout
        sourced = subprocess.run(
            ["bash", "-c", f"source {state_dir}/env.sh && env -0"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        # a surrounding Slurm job's variables would send srun to that job, not this cluster
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for entry in sourced.stdout.decode().split("\0"):
            key, _, value = entry.partition("=")
            if key.startswith("SLURM_"):
                client_env[key] = value
        assert client_env["SLURM_CONF"] == str(state_dir / "slurm.conf")
        yield state_dir, client_env
    finally:
        cluster("stop", state_dir, timeout=60)


def test_sinfo_shows_two_idle_nodes_in_debug_and_high(slurm):
    _, env = slurm
    result = run(["sinfo", "-h", "-N", "-o", "%N %P %t"], env)
    assert result.returncode == 0, result.stderr
    listed = sorted(result.stdout.split("\n")[:-1])
    assert listed == ["n1 debug* idle", "n1 high idle", "n2 debug* idle", "n2 high idle"]
    preemption = run(["scontrol", "show", "config"], env).stdout
    assert "PreemptMode             = REQUEUE" in preemption and "preempt/partition_prio" in preemption
    high = run(["scontrol", "show", "partition", "high"], env).stdout
    assert "PriorityTier=2" in high and "PreemptMode=OFF" in high
    debug = run(["scontrol", "show", "partition", "debug"], env).stdout
    assert "PriorityTier=1" in debug and "GraceTime=60" in debug


def test_two_node_batch_job_runs_one_task_per_node(slurm, tmp_path):
    _, env = slurm
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nsrun hostname\nsrun bash -c 'echo task $SLURMD_NODENAME $SLURM_NODEID $SLURM_PROCID'\n"
    )
    result = run(
        ["sbatch", "--wait", "-N2", "-n2", f"--chdir={tmp_path}", "--output=job-%j.out", str(script)],
        env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[-1]
    lines = (tmp_path / f"job-{job_id}.out").read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("task ")) == ["task n1 0 0", "task n2 1 1"]
    assert lines.count(socket.gethostname()) == 2


def test_scancel_usr1_reaches_the_batch_script_trap(slurm, tmp_path):
    _, env = slurm
    script = tmp_path / "trap.sh"
    script.write_text(
        "#!/bin/bash\ntrap 'echo usr1 > marker; exit 0' USR1\ntouch started\nwhile true; do sleep 0.2; done\n"
    )
    submitted = run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--output=trap.out", str(script)], env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_for((tmp_path / "started").exists, 30, f"job {job_id} to start")
        signalled = run(["scancel", "-b", "-s", "USR1", job_id], env)
        assert signalled.returncode == 0, signalled.stderr
        wait_for((tmp_path / "marker").exists, 15, "the USR1 trap's marker file")
        assert (tmp_path / "marker").read_text() == "usr1\n"

        def job_state() -> str:
            shown = run(["scontrol", "show", "job", job_id], env).stdout
            return (
                next(w for w in shown.split() if w.startswith("JobState="))
                + " "
                + next(w for w in shown.split() if w.startswith("ExitCode="))
            )

        wait_for(lambda: "COMPLETING" not in job_state() and "RUNNING" not in job_state(), 15, "job end")
        assert job_state() == "JobState=COMPLETED ExitCode=0:0"
    finally:
        run(["scancel", job_id], env)


def test_unknown_partition_is_refused_by_sbatch(slurm):
    _, env = slurm
    result = run(["sbatch", "--partition=no_such_partition", "--wrap=true"], env)
    assert result.returncode != 0
    assert "invalid partition specified: no_such_partition" in result.stderr


# last in the file: it stops the module's cluster (the fixture's own stop is then a no-op)
def test_stop_leaves_no_daemon_running(slurm):
    state_dir, env = slurm
    assert run(["pgrep", "-f", str(state_dir)], env).stdout.split(), "the cluster was not running"
    stopped = cluster("stop", state_dir, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    left = run(["pgrep", "-af", str(state_dir)], env)
    assert left.stdout == "", f"still running after stop:\n{left.stdout}"
    assert not list(state_dir.glob("*.pid"))
    # slurmscriptd and slurmstepd do not name the directory on their command line; they run inside it
    inside = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and cwd_in(p, state_dir)]
    assert inside == [], f"processes still running in {state_dir}: {inside}"
