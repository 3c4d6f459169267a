"""Start `python -m train` under the selected launch: print the exact command, or run it.

    python -m launch launch=ddp launch.num_processes=2 training.max_steps=10      # prints
    python -m launch launch=ddp launch.num_processes=2 launch.run=true ...        # runs it
    python -m launch launch=slurm launch.nodes=4 model=70b ...                     # submits a Slurm job
    python -m launch --dry-run launch=slurm ...                                    # shows its script

The printed line is what a user would type; `accelerate launch -m train ...` by hand works
the same. Every process runs the same `python -m train` with the same overrides, which include
`training.resume_from_checkpoint=latest`: the same command on the same run directory goes on from
its latest complete checkpoint (after SIGTERM or USR1 to a running launch, which checkpoints and stops).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from train.config import Config, ConfigError, compose_config, load_config
from train.plan import Device, check_fits
from train.run.run_dir import STOP_FILE, STOPPED_FILE

REPO = Path(__file__).resolve().parents[1]


def accelerate_arguments(config: Config, overrides: list[str]) -> list[str]:
    """``accelerate launch`` arguments for ``config.launch``, ending in ``-m train <overrides>``
    (``train_overrides``' own)."""
    launch = config.launch
    arguments = process_arguments(config)
    if launch.num_machines == 1 and launch.num_processes > 1:
        # a free port, not torch's fixed 29500: runs started back to back (sweeps, tests) would collide
        arguments += ["--main_process_port", str(free_port())]
    return [*arguments, "-m", "train", *overrides]


def process_arguments(config: Config) -> list[str]:
    """The config file, the process and machine counts and context parallelism's sizes, as ``accelerate
    launch`` takes them."""
    launch = config.launch
    arguments = []
    if launch.accelerate_config:
        arguments += ["--config_file", str(REPO / launch.accelerate_config)]
    total = launch.num_processes * launch.num_machines
    arguments += ["--num_processes", str(total), "--num_machines", str(launch.num_machines)]
    if launch.strategy.startswith("zero") and launch.num_machines > 1:
        # one torchrun per machine, as for DDP/FSDP; unset, accelerate runs DeepSpeed's pdsh runner instead
        # (launch/accelerate/zero3.yaml says where). Here too, not only in our yaml: it shows in the printed
        # line and the sbatch script, and an accelerate_config of the user's own gets it as well
        arguments += ["--deepspeed_multinode_launcher", "standard"]
    if (
        launch.cp_size > 1
    ):  # accelerate's ParallelismConfig: FSDP2 shards over dp_shard x cp, cp splits sequences
        shards = str(total // launch.cp_size)
        arguments += ["--use_parallelism_config", "--parallelism_config_dp_shard_size", shards,
                      "--parallelism_config_cp_size", str(launch.cp_size)]  # fmt: skip
    return arguments


def train_overrides(overrides: list[str]) -> tuple[Path, list[str]]:
    """The run directory and the overrides every process gets: the launcher's own left out,
    ``hydra.run.dir`` fixed here, once, so that every process writes into the same directory, and
    ``training.resume_from_checkpoint=latest`` unless given: a run directory that has a complete
    checkpoint goes on from it (a requeued or resubmitted job), a new one starts at step 0."""
    kept = [o for o in overrides if not o.lstrip("+").startswith("launch.run=")]
    run_dirs = [o.partition("=")[2] for o in kept if o.startswith("hydra.run.dir=")]
    if run_dirs:
        run_dir = Path(run_dirs[0]).absolute()
    else:
        run_dir = Path.cwd() / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S")
        kept.append(f"hydra.run.dir={run_dir}")
    if not any(o.lstrip("+").startswith("training.resume_from_checkpoint=") for o in kept):
        kept.append("training.resume_from_checkpoint=latest")
    return run_dir, kept


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        config = load_config(compose_config(argv))
        check_fits(config, Device.configured(config.launch))  # for the GPUs it asks, before any queue
        if config.launch.slurm is not None:
            return submit_to_slurm(config, argv, dry_run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir, overrides = train_overrides(argv)
    arguments = accelerate_arguments(config, overrides)
    if config.launch.num_machines > 1:
        given = run_dir if any(o.startswith("hydra.run.dir=") for o in argv) else None
        return start_on_machines(config, arguments, config.launch.run and not dry_run, given)
    print(shlex.join(["accelerate", "launch", *arguments]))
    if dry_run or not config.launch.run:
        return 0
    # the same launcher, from this interpreter, so an unactivated venv works too
    return run_until_stopped([sys.executable, "-m", "accelerate.commands.launch", *arguments], run_dir)


def run_until_stopped(command: list[str], run_dir: Path) -> int:
    """Run ``command`` and wait for it. SIGTERM or USR1 to this process asks the run to checkpoint at its
    next step and stop (the run's stop file, which every rank reads), and this process waits for that;
    Ctrl-C (SIGINT) stops everything at once, as ever."""
    stop_file = run_dir / STOP_FILE

    def request_stop(number: int, frame) -> None:
        name = signal.Signals(number).name
        print(f"{name}: the run checkpoints at its next step, then stops ({stop_file})", file=sys.stderr)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        status = subprocess.Popen(command).wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop_file.unlink(missing_ok=True)  # a request the run finished before seeing
    if (run_dir / STOPPED_FILE).is_file():
        step, reason = (run_dir / STOPPED_FILE).read_text().split(maxsplit=1)
        print(
            f"stopped ({reason.strip()}) with checkpoint-{step} complete; the same command goes on from it",
            file=sys.stderr,
        )
    return status


RENDEZVOUS = {
    "MACHINE_RANK": "--machine_rank",
    "MAIN_ADDR": "--main_process_ip",
    "MAIN_PORT": "--main_process_port",
}


def start_on_machines(config: Config, arguments: list[str], run: bool, run_dir: Path | None) -> int:
    """Several machines without Slurm: the same line on every machine, each with its own MACHINE_RANK
    (0 .. num_machines-1) and every one with machine 0's MAIN_ADDR and a MAIN_PORT open there.
    ``run_dir``: the one the user gave (every machine must name the same), or None."""
    machines = config.launch.num_machines
    before, train = arguments[: arguments.index("-m")], arguments[arguments.index("-m") :]
    if not run:
        rendezvous = " ".join(f'{flag} "${variable}"' for variable, flag in RENDEZVOUS.items())
        print(f"# on each of the {machines} machines, with MACHINE_RANK, MAIN_ADDR and MAIN_PORT set:")
        print(shlex.join(["accelerate", "launch", *before]), rendezvous, shlex.join(train))
        return 0
    missing = [variable for variable in RENDEZVOUS if not os.environ.get(variable)]
    missing += [] if run_dir else ["hydra.run.dir"]
    if missing:
        print(
            f"error: launch.num_machines={machines}: set {', '.join(missing)} on each machine "
            f"(MACHINE_RANK 0..{machines - 1}, MAIN_ADDR and MAIN_PORT of machine 0, the same "
            "hydra.run.dir on a shared file system); or use launch=slurm, which does it for you",
            file=sys.stderr,
        )
        return 2
    rendezvous = [part for variable, flag in RENDEZVOUS.items() for part in (flag, os.environ[variable])]
    return run_until_stopped(
        [sys.executable, "-m", "accelerate.commands.launch", *before, *rendezvous, *train], run_dir
    )


def submit_to_slurm(config: Config, argv: list[str], dry_run: bool) -> int:
    """Write the run's sbatch script and submit it; with ``--dry-run`` only print it."""
    from launch import slurm

    config = slurm.with_signal_seconds(config)
    run_dir, overrides = train_overrides(argv)
    script = slurm.render_script(config, process_arguments(config), overrides, run_dir)
    if dry_run:
        print(script, end="")
        return 0
    problems = slurm.cluster_problems(config)
    if problems:
        raise ConfigError("Slurm cannot run this job:\n  " + "\n  ".join(problems))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / slurm.SCRIPT_NAME
    path.write_text(script)
    job = slurm.submit(path)
    print(f"submitted job {job}: script {path}")
    print(f"log: {run_dir / f'slurm-{job}.out'}   (squeue -j {job}; scancel {job})")
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
