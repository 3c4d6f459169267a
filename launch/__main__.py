"""Start `python -m train` under the selected launch: print the exact command, or run it.

    python -m launch launch=ddp launch.num_processes=2 training.max_steps=10      # prints
    python -m launch launch=ddp launch.num_processes=2 launch.run=true ...        # runs it

The printed line is what a user would type; `accelerate launch -m train ...` by hand works
the same. Every process runs the same `python -m train` with the same overrides.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from train.config import Config, ConfigError, compose_config, load_config

REPO = Path(__file__).resolve().parents[1]


def accelerate_arguments(config: Config, overrides: list[str]) -> list[str]:
    """``accelerate launch`` arguments for ``config.launch``, ending in ``-m train <overrides>``."""
    launch = config.launch
    arguments = []
    if launch.accelerate_config:
        arguments += ["--config_file", str(REPO / launch.accelerate_config)]
    total = launch.num_processes * launch.num_machines
    arguments += ["--num_processes", str(total), "--num_machines", str(launch.num_machines)]
    if launch.num_machines == 1 and total > 1:
        # a free port, not torch's fixed 29500: runs started back to back (sweeps, tests) would collide
        arguments += ["--main_process_port", str(free_port())]
    train_overrides = [o for o in overrides if not o.lstrip("+").startswith("launch.run=")]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        # every process must write into the same run directory, so it is fixed here, once
        train_overrides.append(f"hydra.run.dir={Path.cwd() / 'outputs' / time.strftime('%Y-%m-%d/%H-%M-%S')}")
    return [*arguments, "-m", "train", *train_overrides]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> int:
    try:
        config = load_config(compose_config(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    arguments = accelerate_arguments(config, argv)
    print(shlex.join(["accelerate", "launch", *arguments]))
    if not config.launch.run:
        return 0
    # the same launcher, from this interpreter, so an unactivated venv works too
    return subprocess.call([sys.executable, "-m", "accelerate.commands.launch", *arguments])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
