"""`python -m launch launch=slurm`: the rendered sbatch script, and real jobs on the local two-node cluster —
rendezvous across nodes (DDP, and DeepSpeed ZeRO-3 as one world), the time-limit signal and preemption
(checkpoint, requeue, resume), and a node's processes killed (fail fast, requeue, resume)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import NO_EVAL
from test_slurm_cluster import run, slurm, wait_for  # noqa: F401  (slurm: the module's cluster fixture)

from launch.slurm import time_limit_seconds

# two nodes, one CPU process each: DDP over gloo across the "nodes" of the local cluster
CPU_JOB = [
    "launch=slurm",
    "launch.nodes=2",
    "launch.gpus_per_node=0",
    "launch.num_processes=1",
    "launch.slurm.cpus_per_task=1",
    "launch.slurm.mem=null",
    "training.max_steps=12",
    "training.save_steps=4",
    "training.logging_steps=1",
    "training.per_device_train_batch_size=1",
    "training.report_to=[]",
    "method.lora_dropout=0.1",  # dropout on: a resumed job must restore every rank's RNG
    NO_EVAL,
]


def launch(*overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *overrides],
        cwd=cwd,
        env=env or os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_shows_the_sbatch_script(tmp_path):
    result = launch(
        "--dry-run", "launch=slurm", "launch.nodes=4", "launch.gpus_per_node=8", "launch.strategy=zero3",
        "launch.slurm.partition=gpu", "launch.slurm.account=proj42", "launch.slurm.qos=high",
        "launch.slurm.constraint=h100", "launch.slurm.time=2:00:00", "launch.slurm.signal_seconds=300",
        "launch.slurm.sbatch_extra=[--exclusive]", "launch.slurm.setup=[module load cuda/12.4]",
        f"hydra.run.dir={tmp_path / 'run'}", "model=8b",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes and submits nothing
    sbatch = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert sbatch == [
        "--job-name=llama31-8b-lora", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=32",
        "--time=2:00:00", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
        f"--output={tmp_path / 'run' / 'slurm-%j.out'}", f"--chdir={tmp_path}", "--gpus-per-node=8",
        "--partition=gpu", "--account=proj42", "--qos=high", "--constraint=h100", "--mem=0", "--exclusive",
    ]  # fmt: skip
    assert "\nmodule load cuda/12.4\n" in script
    config_file = Path(__file__).resolve().parents[1] / "launch" / "accelerate" / "zero3.yaml"
    # one torchrun per node, DeepSpeed too: unset, accelerate would run DeepSpeed's pdsh runner on every node
    launcher = "--deepspeed_multinode_launcher standard"
    assert f"--config_file {config_file} --num_processes 32 --num_machines 4 {launcher} \\" in script
    assert '--machine_rank "$SLURM_NODEID"' in script
    assert '--main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"' in script
    assert 'MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    # every start resumes: a requeued or resubmitted job goes on, a new run directory starts at step 0
    assert f"hydra.run.dir={tmp_path / 'run'} model=8b training.resume_from_checkpoint=latest &\n" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}\n" in script
    assert """touch "$STOP_FILE"' USR1\n""" in script and """touch "$STOP_FILE"' TERM\n""" in script
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr  # valid bash


def test_the_usr1_window_is_sized_from_the_checkpoint_and_a_limit_too_short_to_save_is_refused(tmp_path):
    big = ["launch=slurm", "model=70b", "method=full", "launch.nodes=4", "launch.strategy=fsdp"]
    result = launch("--dry-run", *big, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # 846.6 GB (12 B x 70.55e9 parameters: fp32 weights and moments) at 1 GB/s, plus a 120 s margin
    assert "#SBATCH --signal=B:USR1@967\n" in result.stdout
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-967}" in result.stdout  # torchrun waits as long for its workers
    refused = launch("--dry-run", *big, "launch.slurm.time=15", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (
        "error: launch.slurm.time=15 (900 s) is not longer than the 967 s needed to save a checkpoint, "
        "846.6 GB (python -m train.plan) at checkpoint_write_gb_per_s=1, plus signal_margin_seconds=120: it "
        "could not save once; raise launch.slurm.time" in refused.stderr
    )
    faster_disks = ["launch.slurm.time=15", "launch.slurm.checkpoint_write_gb_per_s=5"]
    faster = launch("--dry-run", *big, *faster_disks, cwd=tmp_path)
    assert faster.returncode == 0 and "#SBATCH --signal=B:USR1@290\n" in faster.stdout  # 170 s + 120 s


@pytest.mark.parametrize(
    ("limit", "seconds"),
    [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-0", 86400), ("1-2:03", 93780), ("INFINITE", None)],
)  # fmt: skip
def test_slurm_time_limits_are_read_as_sbatch_reads_them(limit, seconds):
    assert time_limit_seconds(limit) == seconds


def test_inconsistent_slurm_counts_are_refused(tmp_path):
    result = launch(
        "--dry-run", "launch=slurm", "launch.gpus_per_node=8", "launch.num_processes=4", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "launch.num_processes: 4 != launch.gpus_per_node=8; one process per GPU" in result.stderr


def test_a_gpu_job_on_a_node_without_gpus_stops_with_our_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train", "launch=slurm", "launch.nodes=1", "launch.gpus_per_node=1",
         f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "launch.gpus_per_node=1 but" in result.stderr and "has no usable GPU" in result.stderr
    assert "launch.gpus_per_node=0 launch.num_processes=N" in result.stderr
    assert "Traceback" not in result.stderr


# ── real jobs on the local cluster ──────────────────────────────────────────────


@pytest.fixture(autouse=True)
def no_job_left(request):
    """After each test, no job of it left on the cluster, passed or failed: a failed job test used to leave
    its job completing, and the next test, which asserts an empty queue, failed with it."""
    yield
    if "slurm" not in request.fixturenames:
        return
    _, env = request.getfixturevalue("slurm")
    left = run(["squeue", "-h", "-o", "%i"], env).stdout.split()
    if left:
        run(["scancel", *left], env)
        wait_for(lambda: not run(["squeue", "-h"], env).stdout.strip(), 120, "the queue to empty")


def job_state(job: str, env) -> dict[str, str]:
    shown = run(["scontrol", "show", "job", "-o", job], env).stdout
    return dict(word.split("=", 1) for word in shown.split() if "=" in word)


def wait_for_end(job: str, env, timeout: float = 420) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for(lambda: job_state(job, env).get("JobState") in ended, timeout, f"job {job} to end")
    return job_state(job, env)


def submit(run_dir: Path, env, *overrides: str) -> str:
    result = launch(*CPU_JOB, f"hydra.run.dir={run_dir}", *overrides, cwd=run_dir.parent, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run directory: {run_dir}" in result.stdout
    return result.stdout.split("submitted job ")[1].split(":")[0]


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def finished(run_dir: Path, job: str, state: dict) -> str:
    log = (run_dir / f"slurm-{job}.out").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    return log


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):  # noqa: F811
    _, env = slurm
    run_dir = tmp_path_factory.mktemp("slurm-jobs") / "uninterrupted"
    job = submit(run_dir, env)
    log = finished(run_dir, job, wait_for_end(job, env))
    return run_dir, log


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_rendezvous_and_trains(uninterrupted):
    run_dir, log = uninterrupted
    assert "job " in log and "2 node(s) (n[1-2]), main localhost:" in log
    assert "launch=slurm: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel" in log
    assert [step for step, _ in logged_losses(run_dir)] == list(range(1, 13))
    assert "training exited with status 0" in log


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_node_zero3_job_is_one_world_and_trains_like_ddp(slurm, uninterrupted, tmp_path):  # noqa: F811
    """launch.strategy=zero3 over the two nodes: one 2-process DeepSpeed world, started as DDP's is (one
    torchrun per node; accelerate's default pdsh runner died here with FileNotFoundError: 'deepspeed'), with
    the losses of the DDP job step for step, dropout included."""
    _, env = slurm
    run_dir = tmp_path / "zero3"
    job = submit(run_dir, env, "launch.strategy=zero3")
    log = finished(run_dir, job, wait_for_end(job, env))
    assert "--deepspeed_multinode_launcher standard" in (run_dir / "slurm-job.sh").read_text()
    assert (
        "launch=slurm: 2 process(es), engine DEEPSPEED, backend gloo, model DeepSpeedEngine, ZeRO-3, "
        "offload optimizer none, parameters none" in log
    )
    # the pdsh runner writes the whole environment (tokens too) into the job's working directory
    assert not (tmp_path / ".deepspeed_env").exists()
    final = run_dir / "checkpoints" / "checkpoint-12"
    states = sorted(path.name for path in (final / "global_step12").glob("*_optim_states.pt"))
    assert (final / "COMPLETE").is_file()
    assert states == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]  # one per node
    zero3, ddp = logged_losses(run_dir), logged_losses(uninterrupted[0])
    assert [step for step, _ in zero3] == list(range(1, 13))
    for (step, loss), (_, reference) in zip(zero3, ddp, strict=True):
        assert loss == pytest.approx(reference, abs=1e-4), step


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_node_grpo_job_generates_on_both_nodes_and_trains(slurm, tmp_path):  # noqa: F811
    """stage=grpo as a 2-node job: each node's process generates its half of a group (2 of 4 completions),
    the rewards are gathered across nodes, and the job ends with the adapter saved."""
    _, env = slurm
    run_dir = tmp_path / "grpo"
    job = submit(
        run_dir, env, "stage=grpo", "data=arithmetic_sample", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "stage.num_generations=4", "stage.max_completion_length=8",
        "stage.rewards=[{_target_: train.run.rewards.latin_share}]",
    )  # fmt: skip
    log = finished(run_dir, job, wait_for_end(job, env))
    assert "launch=slurm: 2 process(es), engine MULTI_CPU, backend gloo" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [(row["step"], row["reward"]) for row in rows if "reward" in row]
    assert [step for step, _ in rewards] == [1, 2] and all(0 <= reward <= 1 for _, reward in rewards)
    completions = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * 4  # each step's whole group, gathered from both nodes


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_node_qlora_reward_model_job_loads_sharded_and_trains(slurm, tmp_path):  # noqa: F811
    """stage=rm with QLoRA under FSDP as a 2-node job: each node writes its random base once, rank 0 reads
    and quantizes it for both nodes at step 0, the new score head is on both, and the job ends with the
    SEQ_CLS adapter (the head beside the LoRA weights) and TRL's accuracy and margin for every step."""
    _, env = slurm
    run_dir = tmp_path / "rm"
    job = submit(
        run_dir, env, "stage=rm", "data=reward_sample", "method=qlora", "launch.strategy=fsdp",
        "training.max_steps=2", "training.per_device_train_batch_size=1",
    )  # fmt: skip
    log = finished(run_dir, job, wait_for_end(job, env))
    assert "launch=slurm: 2 process(es), engine FSDP" in log
    assert "read and quantized by rank 0, one tensor at a time" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], row["accuracy"], row["margin"]) for row in rows if "loss" in row]
    assert [step for step, _, _ in logged] == [1, 2] and all(a in (0.0, 0.5, 1.0) for _, a, _ in logged)
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]


def expect_resumed_run(run_dir: Path, uninterrupted_dir: Path, state: dict, restarts: int = 1) -> None:
    """One continuous log, each step once, with the losses of the run that was never interrupted:
    the resumed run restored the weights, the optimizer and the data order."""
    assert state["Restarts"] == str(restarts)
    resumed, expected = logged_losses(run_dir), logged_losses(uninterrupted_dir)
    assert [step for step, _ in resumed] == list(range(1, 13))
    for (step, loss), (_, reference) in zip(resumed, expected, strict=True):
        assert loss == pytest.approx(reference, abs=1e-4), step


@pytest.mark.slow
@pytest.mark.slurm
def test_a_preempted_job_checkpoints_in_its_grace_time_requeues_and_resumes(slurm, uninterrupted, tmp_path):  # noqa: F811
    """Real preemption (local_cluster.sh: partition_prio, PreemptMode=REQUEUE, GraceTime=60): a job in the
    high partition that needs both nodes makes Slurm send SIGTERM to the training job's tasks; the run
    checkpoints at the next step and the script requeues it, so the high job starts within the grace
    time; once it has ended, the training job resumes at the saved step."""
    _, env = slurm
    run_dir = tmp_path / "preempted"
    job = submit(run_dir, env)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, "step 2")
    high = run(
        ["sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", f"--chdir={tmp_path}",
         "--output=high.out", "--wrap", "sleep 2"],
        env,
    )  # fmt: skip
    assert high.returncode == 0, high.stderr
    high_job = high.stdout.strip().split(";")[0]
    log = finished(run_dir, job, state := wait_for_end(job, env))
    stopped = int(log.split("stop requested (SIGTERM): checkpoint at step ")[1].split(",")[0])
    assert 2 <= stopped < 12
    assert f"stopped (SIGTERM) with checkpoint-{stopped} complete; requeueing job {job}" in log
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{stopped}'}\n" in log
    preemptor = job_state(high_job, env)
    assert preemptor["JobState"] == "COMPLETED"
    waited = datetime.fromisoformat(preemptor["StartTime"]) - datetime.fromisoformat(preemptor["SubmitTime"])
    assert waited.total_seconds() < 60  # the preempted job gave the nodes back within its grace time
    restarted = datetime.fromisoformat(log.split("restart 1: resuming")[0].splitlines()[-1].split()[0])
    assert restarted.replace(tzinfo=None) >= datetime.fromisoformat(preemptor["EndTime"])  # once it ended
    expect_resumed_run(run_dir, uninterrupted[0], state)


def kill_processes_of(job: str, node_id: int) -> list[int]:
    """SIGKILL every process of the job's task on one node (its launcher and training processes), as when
    the node dies or the OOM killer strikes: nothing is flushed, nobody is told."""
    killed = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            environ = dict(
                item.split("=", 1) for item in (process / "environ").read_text().split("\0") if "=" in item
            )
        except OSError:
            continue
        if environ.get("SLURM_JOB_ID") == job and environ.get("SLURM_NODEID") == str(node_id):
            if "train" in (process / "cmdline").read_text(errors="replace"):
                os.kill(int(process.name), signal.SIGKILL)
                killed.append(int(process.name))
    return killed


@pytest.mark.slow
@pytest.mark.slurm
def test_a_job_outlives_its_time_limit_and_a_lost_node(slurm, uninterrupted, tmp_path):  # noqa: F811
    """One job, two things a cluster does to it, each ending in a requeue and a resume:

    1. a real time limit, --time=2 --signal=B:USR1@80: Slurm's timer looks every 30 s and signals up to
       30 s early, so the batch shell gets USR1 10-40 s into the job: before training, as a 35 s
       first-start setup line (a slow `module load`) delays it (with 25 s a signal right at 40 s came when
       training had reached step 8, too late for a periodic checkpoint before the end). The run
       checkpoints at its next step and the script requeues it. The limit is raised meanwhile, so the rest
       fits in one start.
    2. no signal at all: after the resumed start's next periodic checkpoint the second node's processes
       are SIGKILLed; srun ends the first node's at once (--kill-on-bad-exit: gloo's or NCCL's timeout
       would be 30 minutes) and the script, seeing a failure after a checkpoint this start saved, requeues.
    The third start finishes with the losses of the job that was never interrupted, each step once."""
    _, env = slurm
    run_dir = tmp_path / "time-limit"
    checkpoints = run_dir / "checkpoints"
    limit = ["launch.slurm.time=2", "launch.slurm.signal_seconds=80",
             f"launch.slurm.setup=['test -d {checkpoints} || sleep 35']"]  # fmt: skip
    job = submit(run_dir, env, *limit)
    assert "#SBATCH --time=2\n#SBATCH --signal=B:USR1@80\n" in (run_dir / "slurm-job.sh").read_text()
    out = run_dir / f"slurm-{job}.out"
    signalled = "USR1: checkpoint at the next step, then requeue"
    wait_for(lambda: out.is_file() and signalled in out.read_text(), 240, "the time-limit signal")
    # raised while this start checkpoints, before its requeue: the next start must not get USR1 again
    raised = run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env)
    assert raised.returncode == 0, raised.stderr
    wait_for(lambda: "; requeueing job" in out.read_text(), 120, "the requeue after the time-limit signal")
    log = out.read_text()
    assert "USR1: checkpoint at the next step, then requeue" in log
    stopped = int(log.split("stop requested (checkpoint-and-stop): checkpoint at step ")[1].split(",")[0])
    assert 1 <= stopped < 12
    assert f"stopped (checkpoint-and-stop) with checkpoint-{stopped} complete; requeueing job {job}" in log

    periodic = checkpoints / f"checkpoint-{(stopped // 4 + 1) * 4}"  # save_steps=4
    assert periodic.name != "checkpoint-12", "stopped too late for a periodic checkpoint before the end"
    wait_for((periodic / "COMPLETE").is_file, 240, periodic.name)
    assert kill_processes_of(job, node_id=1)
    killed_at = time.monotonic()
    wait_for(lambda: out.read_text().count("; requeueing job") == 2, 60, "the failed job to be requeued")
    assert time.monotonic() - killed_at < 30

    log = finished(run_dir, job, state := wait_for_end(job, env))
    assert f"restart 1: resuming from {checkpoints / f'checkpoint-{stopped}'}\n" in log
    saved = log.split("failed after saving ")[1].split()[0]
    assert saved in (str(periodic), str(checkpoints / f"checkpoint-{int(periodic.name[11:]) + 4}")), log[
        -3000:
    ]
    assert f"in this start; requeueing job {job} to resume" in log
    assert f"restart 2: resuming from {saved}\n" in log
    assert not (run_dir / "checkpoint-and-stop").exists()
    expect_resumed_run(run_dir, uninterrupted[0], state, restarts=2)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launch.slurm.partition=no_such_partition"],
         "launch.slurm.partition: no partition 'no_such_partition' on this cluster; "
         "set launch.slurm.partition to one of: debug, high"),
        (["launch.gpus_per_node=1", "launch.num_processes=1"],
         "launch.gpus_per_node=1: partition 'debug' has no GPUs (sinfo GRES: (null))"),
        (["launch.nodes=3"], "launch.nodes=3: partition 'debug' has 2 node(s); lower launch.nodes"),
    ],
)  # fmt: skip
def test_a_job_the_cluster_cannot_run_is_refused_before_submitting(slurm, tmp_path, overrides, message):  # noqa: F811
    _, env = slurm
    result = launch(*CPU_JOB, f"hydra.run.dir={tmp_path / 'run'}", *overrides, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "error: Slurm cannot run this job:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    assert run(["squeue", "-h"], env).stdout == ""


@pytest.mark.slow
@pytest.mark.slurm
def test_a_search_on_slurm_runs_each_trial_as_its_own_job(slurm, tmp_path):  # noqa: F811
    """hydra/sweeper=optuna with hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml, submitit): the trials
    asked at once (n_jobs) are one job array, one trial per job, and what each job's run returns (its final
    eval loss) is what Optuna is told."""
    import optuna

    _, env = slurm
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "train", "+experiment=search_lr_rank", "hydra/launcher=slurm",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.sweeper.n_trials=3",
         "hydra.sweeper.n_jobs=3", "training.max_steps=2", "training.report_to=[]", "data.eval_split=2",
         "samples.count=0", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with (sweep_dir / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    study = optuna.load_study(study_name="search_lr_rank", storage=f"sqlite:///{sweep_dir}/optuna.db")
    jobs = sorted(
        path.name
        for path in (sweep_dir / ".submitit").iterdir()
        if path.name[0].isdigit() and "_" in path.name
    )
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_0", f"{array}_1", f"{array}_2"]  # one array job, one task per trial
    for point, (row, job, trial) in enumerate(zip(rows, jobs, study.trials, strict=True)):
        assert row["status"] == "finished" and trial.value == pytest.approx(float(row["eval_loss"])), row
        adapter = json.loads((sweep_dir / str(point) / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == trial.params["method.r"]
        log = (sweep_dir / ".submitit" / job / f"{job}_0_log.out").read_text()
        assert f"run directory {sweep_dir / str(point)};" in log  # trained inside that Slurm job
