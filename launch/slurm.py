"""``launch=slurm``: the sbatch script for a run, the cluster checks before it is queued, and submission.

The job runs one ``accelerate launch`` per node through ``srun``; every node computes the same
main address (the first node's ``NodeAddr``) and takes its machine rank from ``SLURM_NODEID``.
A stop request makes the run write a checkpoint at the next step and stop: SIGTERM to the tasks
(preemption, ``scancel``; torchrun passes it on to its workers), or USR1 to the batch shell
(``--signal=B:USR1@<s>`` before the time limit, or ``scancel -b -s USR1 <job>``), which creates the
run's stop file. When the run says it stopped so (``<run>/stopped``) the script requeues the job.
Every start passes ``training.resume_from_checkpoint=latest``: a requeued or resubmitted job goes on
from the latest complete checkpoint, a new run directory starts at step 0.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from train.config import Config, ConfigError
from train.plan import Device, plan_run
from train.run.run_dir import STOP_FILE, STOPPED_FILE

SCRIPT_NAME = "slurm-job.sh"

_TEMPLATE = """\
#!/bin/bash
# Written by `python -m launch` for the run in {run_dir}; resubmit with: sbatch {script}
{sbatch}
RUN_DIR={run_dir_q}
STOP_FILE="$RUN_DIR/{stop_file}"
STOPPED_FILE="$RUN_DIR/{stopped_file}"
# USR1 (--signal=B:USR1 before the time limit, or scancel -b -s USR1) or SIGTERM to this shell: checkpoint at
# the next step, stop, requeue. Preemption and scancel send SIGTERM to the training processes themselves.
# Trapped first: Slurm may send USR1 as early as the job starts, and untrapped it ends this shell.
trap 'echo "$(date -Is) USR1: checkpoint at the next step, then requeue"; touch "$STOP_FILE"' USR1
trap 'echo "$(date -Is) TERM: checkpoint at the next step, then requeue"; touch "$STOP_FILE"' TERM
set -uo pipefail
{setup}
PYTHON={python}
rm -f "$STOPPED_FILE"
# torchrun gives its workers this long after SIGTERM to write their checkpoint, then SIGKILLs them
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{signal_seconds}}}

newest_checkpoint() {{  # the newest checkpoint every rank finished writing, or nothing
    ls -d "$RUN_DIR"/checkpoints/checkpoint-*/COMPLETE 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname
}}
AT_START=$(newest_checkpoint)

# rendezvous: machine 0 is the job's first node, reached at the address Slurm has for it
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_ADDR=$(scontrol show node "$MAIN_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
MAIN_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')

echo "$(date -Is) job $SLURM_JOB_ID: {nodes} node(s) ($SLURM_JOB_NODELIST), main $MAIN_ADDR:$MAIN_PORT"
echo "$(date -Is) restart ${{SLURM_RESTART_COUNT:-0}}: resuming from ${{AT_START:-step 0 (no checkpoint)}}"

# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): the processes would share one core.
# --kill-on-bad-exit: when one node's processes die, the others are ended at once, not left waiting in a
# collective until the NCCL/gloo timeout
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\
    bash -c 'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' "$PYTHON" \\
    {accelerate} \\
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \\
    -m train {overrides} &
srun_pid=$!
# a trapped signal interrupts `wait`; wait again until srun itself has ended
while true; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
rm -f "$STOP_FILE"  # a request the run finished before seeing

# the run writes it once its stop checkpoint is complete (torchrun then exits non-zero: it was signalled)
if [[ -e $STOPPED_FILE ]]; then
    read -r step reason <"$STOPPED_FILE"
    echo "$(date -Is) stopped ($reason) with checkpoint-$step complete; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$(date -Is) not requeued: Slurm ends the job itself (scontrol requeue, scancel); or sbatch {script}"
    exit 1
fi
echo "$(date -Is) training exited with status $status"
NEWEST=$(newest_checkpoint)
if [[ $status -ne 0 && {requeue_on_failure} == true && -n $NEWEST && $NEWEST != "$AT_START" ]]; then
    echo "$(date -Is) failed after saving $NEWEST in this start; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$status"
"""


def with_signal_seconds(config: Config) -> Config:
    """``config`` with ``launch.slurm.signal_seconds`` decided: as given, or the time to write one checkpoint
    (the planner's ``checkpoint_bytes``) at ``checkpoint_write_gb_per_s``, plus ``signal_margin_seconds``.
    A time limit not longer than that is refused: the job could not train and save even once."""
    slurm = config.launch.slurm
    seconds, why = slurm.signal_seconds, "launch.slurm.signal_seconds"
    if seconds is None:
        size = plan_run(config, Device.configured(config.launch)).checkpoint_bytes
        seconds = math.ceil(size / (slurm.checkpoint_write_gb_per_s * 1e9)) + slurm.signal_margin_seconds
        why = (
            f"{size / 1e9:,.1f} GB (python -m train.plan) at checkpoint_write_gb_per_s="
            f"{slurm.checkpoint_write_gb_per_s:g}, plus signal_margin_seconds={slurm.signal_margin_seconds}"
        )
    limit = time_limit_seconds(slurm.time)
    if limit is not None and limit <= seconds:
        raise ConfigError(
            f"launch.slurm.time={slurm.time} ({limit:,} s) is not longer than the {seconds:,} s needed "
            f"to save a checkpoint, {why}: it could not save once; raise launch.slurm.time (or "
            "launch.slurm.checkpoint_write_gb_per_s, if the file system is faster)"
        )
    launch = dataclasses.replace(config.launch, slurm=dataclasses.replace(slurm, signal_seconds=seconds))
    return dataclasses.replace(config, launch=launch)


def time_limit_seconds(limit: str) -> int | None:
    """Seconds in a Slurm time limit (``--time``: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None: unlimited."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = limit.rpartition("-")
    try:
        parts, day_count = [int(part) for part in clock.split(":")], int(days or 0)
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3:
        raise ConfigError(f"launch.slurm.time={limit}: not a Slurm time limit (M, H:M:S, D-H:M:S, UNLIMITED)")
    if days or len(parts) == 3:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return day_count * 86400 + hours * 3600 + minutes * 60 + seconds


def sbatch_options(config: Config, run_dir: Path) -> list[str]:
    launch, slurm = config.launch, config.launch.slurm
    options = [
        f"--job-name={slurm.job_name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",  # one `accelerate launch` per node; it starts that node's processes
        f"--cpus-per-task={slurm.cpus_per_task}",
        f"--time={slurm.time}",
        f"--signal=B:USR1@{slurm.signal_seconds}",
        "--requeue",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={run_dir / 'slurm-%j.out'}",
        f"--chdir={Path.cwd()}",
    ]
    if launch.gpus_per_node:
        options.append(f"--gpus-per-node={launch.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if (value := getattr(slurm, key)) is not None:
            options.append(f"--{key}={value}")
    return options + list(slurm.sbatch_extra)


def render_script(config: Config, accelerate: list[str], overrides: list[str], run_dir: Path) -> str:
    """The sbatch script. ``accelerate``: the arguments before ``-m train`` except the rendezvous
    ones the job finds itself; ``overrides``: the train overrides, ``hydra.run.dir`` included."""
    slurm = config.launch.slurm
    script = run_dir / SCRIPT_NAME
    return _TEMPLATE.format(
        run_dir=run_dir,
        script=script,
        sbatch="\n".join(f"#SBATCH {option}" for option in sbatch_options(config, run_dir)),
        setup="\n".join(["", *slurm.setup, ""]) if slurm.setup else "",
        run_dir_q=shlex.quote(str(run_dir)),
        python=shlex.quote(slurm.python or sys.executable),
        stop_file=STOP_FILE,
        stopped_file=STOPPED_FILE,
        signal_seconds=slurm.signal_seconds,
        requeue_on_failure=str(slurm.requeue_on_failure).lower(),
        nodes=config.launch.nodes,
        accelerate=shlex.join(accelerate),
        overrides=shlex.join(overrides),
    )


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def cluster_problems(config: Config) -> list[str]:
    """What this cluster cannot give the job, asked of ``sinfo`` before anything is queued."""
    launch, slurm = config.launch, config.launch.slurm
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return ["sbatch/sinfo not found: submit from a Slurm login node, or --dry-run to only see the script"]
    listed = _run(["sinfo", "-h", "-o", "%P|%G|%D|%a"])
    if listed.returncode != 0:
        return [f"sinfo failed ({listed.stderr.strip()}): is this a Slurm login node?"]
    partitions: dict[str, dict] = {}
    default = None
    for line in listed.stdout.splitlines():
        name, gres, count, available = line.split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        entry = partitions.setdefault(name, {"gres": set(), "nodes": 0, "up": available == "up"})
        entry["gres"].add(gres)
        entry["nodes"] += int(count)
    name = slurm.partition or default
    if name is None:
        return ["launch.slurm.partition: this cluster has no default partition; set one of: "
                + ", ".join(sorted(partitions))]  # fmt: skip
    if name not in partitions:
        return [
            f"launch.slurm.partition: no partition {name!r} on this cluster; set launch.slurm.partition to "
            f"one of: {', '.join(sorted(partitions))}"
        ]
    problems = []
    partition = partitions[name]
    if launch.gpus_per_node and not any("gpu" in gres for gres in partition["gres"]):
        problems.append(
            f"launch.gpus_per_node={launch.gpus_per_node}: partition {name!r} has no GPUs (sinfo GRES: "
            f"{', '.join(sorted(partition['gres']))}); choose a GPU partition with "
            "launch.slurm.partition=..., or CPU processes with launch.gpus_per_node=0 launch.num_processes=N"
        )
    if launch.nodes > partition["nodes"]:
        problems.append(
            f"launch.nodes={launch.nodes}: partition {name!r} has {partition['nodes']} node(s); "
            "lower launch.nodes"
        )
    if not partition["up"]:
        problems.append(f"launch.slurm.partition: partition {name!r} is not up (sinfo: down/drain)")
    return problems


def submit(script: Path) -> str:
    """``sbatch`` the script; the job id."""
    result = _run(["sbatch", "--parsable", str(script)])
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
