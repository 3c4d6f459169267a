"""Start `python -m train` under the selected launch: print the exact command, or run it.

    python -m launch launch=ddp launch.num_processes=2 training.max_steps=10      # prints
    python -m launch launch=ddp launch.num_processes=2 launch.run=true ...        # runs it
    python -m launch launch=slurm launch.nodes=4 model=70b ...                     # submits a Slurm job
    python -m launch --dry-run launch=slurm ...                                    # shows its script

The printed line is what a user would type; `accelerate launch -m train ...` by hand works
the same. Every process runs the same `python -m train` with the same overrides.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from train.config import Config, ConfigError, compose_config, load_config
from train.plan import check_fits

REPO = Path(__file__).resolve().parents[1]


def accelerate_arguments(config: Config, overrides: list[str]) -> list[str]:
    """``accelerate launch`` arguments for ``config.launch``, ending in ``-m train <overrides>``."""
    launch = config.launch
    arguments = process_arguments(config)
    if launch.num_machines == 1 and launch.num_processes > 1:
        # a free port, not torch's fixed 29500: runs started back to back (sweeps, tests) would collide
        arguments += ["--main_process_port", str(free_port())]
    return [*arguments, "-m", "train", *train_overrides(overrides)[1]]


def process_arguments(config: Config) -> list[str]:
    """The config file and the process and machine counts, as ``accelerate launch`` takes them."""
    launch = config.launch
    arguments = []
    if launch.accelerate_config:
        arguments += ["--config_file", str(REPO / launch.accelerate_config)]
    total = launch.num_processes * launch.num_machines
    return arguments + ["--num_processes", str(total), "--num_machines", str(launch.num_machines)]


def train_overrides(overrides: list[str]) -> tuple[Path, list[str]]:
    """The run directory and the overrides every process gets: the launcher's own left out, and
    ``hydra.run.dir`` fixed here, once, so that every process writes into the same directory."""
    kept = [o for o in overrides if not o.lstrip("+").startswith("launch.run=")]
    for override in kept:
        if override.startswith("hydra.run.dir="):
            return Path(override.partition("=")[2]).absolute(), kept
    run_dir = Path.cwd() / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S")
    return run_dir, [*kept, f"hydra.run.dir={run_dir}"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        config = load_config(compose_config(argv))
        check_fits(config)  # found now, not after the job waited in a queue
        if config.launch.slurm is not None:
            return submit_to_slurm(config, argv, dry_run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    arguments = accelerate_arguments(config, argv)
    if config.launch.num_machines > 1:
        given = any(o.startswith("hydra.run.dir=") for o in argv)
        return start_on_machines(config, arguments, config.launch.run and not dry_run, given)
    print(shlex.join(["accelerate", "launch", *arguments]))
    if dry_run or not config.launch.run:
        return 0
    # the same launcher, from this interpreter, so an unactivated venv works too
    return subprocess.call([sys.executable, "-m", "accelerate.commands.launch", *arguments])


RENDEZVOUS = {
    "MACHINE_RANK": "--machine_rank",
    "MAIN_ADDR": "--main_process_ip",
    "MAIN_PORT": "--main_process_port",
}


def start_on_machines(config: Config, arguments: list[str], run: bool, run_dir_given: bool) -> int:
    """Several machines without Slurm: the same line on every machine, each with its own MACHINE_RANK
    (0 .. num_machines-1) and every one with machine 0's MAIN_ADDR and a MAIN_PORT open there."""
    machines = config.launch.num_machines
    before, train = arguments[: arguments.index("-m")], arguments[arguments.index("-m") :]
    if not run:
        rendezvous = " ".join(f'{flag} "${variable}"' for variable, flag in RENDEZVOUS.items())
        print(f"# on each of the {machines} machines, with MACHINE_RANK, MAIN_ADDR and MAIN_PORT set:")
        print(shlex.join(["accelerate", "launch", *before]), rendezvous, shlex.join(train))
        return 0
    missing = [variable for variable in RENDEZVOUS if not os.environ.get(variable)]
    missing += [] if run_dir_given else ["hydra.run.dir"]
    if missing:
        print(
            f"error: launch.num_machines={machines}: set {', '.join(missing)} on each machine "
            f"(MACHINE_RANK 0..{machines - 1}, MAIN_ADDR and MAIN_PORT of machine 0, the same "
            "hydra.run.dir on a shared file system); or use launch=slurm, which does it for you",
            file=sys.stderr,
        )
        return 2
    rendezvous = [part for variable, flag in RENDEZVOUS.items() for part in (flag, os.environ[variable])]
    return subprocess.call([sys.executable, "-m", "accelerate.commands.launch", *before, *rendezvous, *train])


def submit_to_slurm(config: Config, argv: list[str], dry_run: bool) -> int:
    """Write the run's sbatch script and submit it; with ``--dry-run`` only print it."""
    from launch import slurm

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
