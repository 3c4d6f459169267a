"""What ``accelerate launch`` (or torchrun) told this process, read from its environment before anything
loads: how many processes on how many machines, and which engine (DDP, FSDP, DeepSpeed ZeRO stage).

A TRL user types ``accelerate launch --config_file their_fsdp.yaml --num_processes 8 -m train model=70b``.
Without ``launch=``, the run takes that launch as its own (and plans it); with an explicit ``launch=`` that
says otherwise, it refuses now, before any weight loads, instead of at step 0 (train/run/launch_check.py,
still the proof of what really ran). Environment names: accelerate 1.15 ``utils/launch.py``, torchrun's
``WORLD_SIZE``/``LOCAL_WORLD_SIZE``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from train.config import ConfigError, LaunchConfig


def started_by_launcher(environ=os.environ) -> bool:
    """torchrun / ``accelerate launch`` started this process (they set WORLD_SIZE for every rank)."""
    return "WORLD_SIZE" in environ


def launched_with_fsdp(environ=os.environ) -> bool:
    """``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launched_with_deepspeed(environ=os.environ) -> bool:
    """``accelerate launch`` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED for every process)."""
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_strategy(environ=os.environ) -> tuple[str, int, int] | None:
    """``(strategy, processes per machine, machines)`` of the launcher that started this process, or None
    when none did (a plain ``python -m train``)."""
    if not started_by_launcher(environ):
        return None
    world = int(environ["WORLD_SIZE"])
    per_machine = int(environ.get("LOCAL_WORLD_SIZE", world))
    if launched_with_fsdp(environ):
        strategy = "fsdp"
    elif environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        strategy = _zero_strategy(environ)
    else:
        strategy = "ddp" if world > 1 else "single"
    return strategy, per_machine, max(1, world // per_machine)


def _zero_strategy(environ) -> str:
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    offload = environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    if stage is None and environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):  # a DeepSpeed JSON of the user's
        with open(environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) as file:
            zero = json.load(file).get("zero_optimization", {})
        stage = zero.get("stage", 0)
        offload = zero.get("offload_param", {}).get("device", "none")
    stage = int(stage or 0)
    if stage == 3:
        return "zero3_offload" if offload not in ("none", "None", None) else "zero3"
    return "zero2"  # stages 1 and 2 shard what ZeRO-2 does or less; the planner counts ZeRO-2


def launch_from_environment(launch: LaunchConfig, explicit: bool, environ=os.environ) -> LaunchConfig:
    """The launch this run is: ``launch`` when nothing launched it or when it agrees with the launcher;
    the launcher's (named ``accelerate``) when ``launch=`` was not chosen explicitly; else ConfigError,
    naming both and the two ways out. A ``launch=`` of several processes that nothing launched is refused
    too, before anything loads."""
    launched = launched_strategy(environ)
    processes = launch.num_processes * launch.num_machines
    if launched is None and explicit and processes > 1:
        raise ConfigError(
            f"launch={launch.name} asks for {processes} process(es) with {launch.strategy}, but this process "
            "was started alone (no WORLD_SIZE: not by accelerate launch or torchrun); start the run with "
            f"`python -m launch launch={launch.name} launch.run=true ...` (it prints the accelerate line)"
        )
    if launched is None:
        return launch
    strategy, per_machine, machines = launched
    if (strategy, per_machine * machines) == (launch.strategy, launch.num_processes * launch.num_machines):
        return launch
    started = f"{per_machine * machines} process(es) on {machines} machine(s) with {strategy}"
    if explicit:
        raise ConfigError(
            f"launch={launch.name} asks for {launch.num_processes * launch.num_machines} process(es) with "
            f"{launch.strategy}, but the launcher started {started} (WORLD_SIZE, ACCELERATE_USE_FSDP / "
            "ACCELERATE_USE_DEEPSPEED): drop launch= to train with the launcher's settings, or start the run "
            f"with `python -m launch launch={launch.name} launch.run=true ...`"
        )
    return dataclasses.replace(
        launch, name="accelerate", strategy=strategy, num_processes=per_machine, num_machines=machines,
        accelerate_config=None,  # the one given to accelerate launch
    )  # fmt: skip
