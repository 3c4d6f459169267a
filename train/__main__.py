"""Fine-tune Llama 3.1 with TRL. One run, top to bottom.

    python -m train                                   # tiny model, LoRA, shipped sample: ~1 min on CPU
    python -m train method=full training.max_steps=10
    python -m train model=8b model.path=/ckpt/Llama-3.1-8B data.path=/data/chat.jsonl
    python -m train stage=dpo data=preference_sample stage.init_from=outputs/<sft run>   # DPO after SFT

Outputs land in ``outputs/<date>/<time>/``: config.yaml, metrics.jsonl, loss.png,
adapter/ (or model/ for full fine-tuning), checkpoints/, wandb/.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.config import FRESH_START_STAGES, ConfigError, load_config, register_configs
from train.plan import check_fits
from train.run.launch_env import launch_from_environment

log = logging.getLogger("train")
register_configs()


def _launch_chosen() -> bool:
    """``launch=`` was chosen (not the default ``local``): then it must agree with whatever launcher started
    this process; otherwise the launcher's settings are the run's (train/run/launch_env.py)."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    chosen = hydra.runtime.choices.get("launch") != "local"
    return chosen or any(override.startswith("launch=") for override in hydra.overrides.task)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_search(config) -> None:
    """An Optuna search (hydra/sweeper=optuna) minimizes each run's final eval loss: refuse a run that holds
    nothing out before it trains for nothing."""
    from hydra.core.hydra_config import HydraConfig

    from train.run.sweep import searching

    if searching(HydraConfig.get()) and not (config.data.eval_split or config.data.eval_path):
        raise ConfigError(
            "hydra/sweeper=optuna minimizes the final eval loss, and this run holds out no data "
            "(data.eval_split=0, no data.eval_path): set data.eval_split=0.05 (or data.eval_path=<file>)"
        )


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run; returns its final eval loss (``train.run.sweep.objective``), which an Optuna sweep
    minimizes."""
    # ── config: typed, validated and checked to fit, before anything expensive ──
    try:
        config = load_config(cfg)
        _check_search(config)
        config.launch = launch_from_environment(config.launch, explicit=_launch_chosen())
        for key in ("name", "strategy", "num_processes", "num_machines", "accelerate_config"):
            cfg.launch[key] = getattr(config.launch, key)  # the saved config says what ran
        check_fits(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(config.output_dir)
    if config.launch.gpus_per_node and not _has_gpu():
        print(
            f"error: launch.gpus_per_node={config.launch.gpus_per_node} but {socket.gethostname()} has no "
            "usable GPU (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): ask Slurm for GPUs (a GPU partition, "
            "launch.slurm.partition=...) or run on CPUs with launch.gpus_per_node=0 launch.num_processes=N",
            file=sys.stderr,
        )
        sys.exit(2)

    from data import DataError, prepare_from_config, tokenizer_for
    from data.config import data_max_length
    from train.model.build import build_model, compute_dtype
    from train.model.placement import place_processes
    from train.run.checkpoints import CheckpointSpaceError
    from train.run.grpo import build_grpo_trainer
    from train.run.outputs import (
        LOSS_PLOT_FILE,
        METRICS_FILE,
        final_dir,
        plot_loss,
        reset_peak_memory,
        save_resolved_config,
    )  # fmt: skip
    from train.run.preference import build_preference_trainer, fresh_start, init_model
    from train.run.reward import build_reward_trainer
    from train.run.sweep import objective
    from train.run.trainer import build_trainer, resume_checkpoint, training_args

    dtype = compute_dtype(config.model.dtype)

    # ── placement: accelerate's state (process group, this rank's device) before any weight loads ──
    try:
        args = training_args(config, run_dir, dtype)  # TRL's SFTConfig / DPOConfig / KTOConfig
        placement = place_processes(config.launch, args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # this run's peak alone, even as one point of a sweep in this process; after placement, which set this
    # rank's GPU: before it, every rank would touch (and create a CUDA context on) GPU 0
    reset_peak_memory()
    if placement.is_main:
        save_resolved_config(cfg, run_dir)
        log.info("run directory %s; computing in %s", run_dir, dtype)

    # ── tokenizer ──────────────────────────────────────────────────────────────
    tokenizer = tokenizer_for(config.model)

    # ── data: the prepared dataset (Llama 3.1 tokens + assistant masks, or preference rows), cached;
    #    each node's main process prepares it first, the others then read its cache ──
    stage = config.stage.name
    try:
        with placement.main_process_first():
            dataset, eval_dataset, summary = prepare_from_config(
                config.data, tokenizer, max_length=data_max_length(config), objective=stage,
                seed=config.training.seed,
            )  # fmt: skip
    except DataError as error:  # a missing file or field, a bad record with data.strict: no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    log.info("data: %s", summary)

    # ── model: base weights (or the run it starts from) on this rank's device, read once per node under
    #    FSDP/ZeRO-3 (train/model/placement.py); QLoRA there is a skeleton until step 0, when rank 0 quantizes
    #    one tensor at a time into each rank's shard (train/model/quantized_loading.py); the LoRA adapter is
    #    applied by the trainer ──
    if stage in FRESH_START_STAGES:  # rm: the decoder under a reward head; an adapter run merged first
        model = fresh_start(config, tokenizer, dtype, placement, reward=stage == "rm")
    elif config.stage.init_from is None:
        model = build_model(
            config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method,
            placement=placement,
        )  # fmt: skip
    else:
        model = init_model(config, tokenizer, dtype, placement)

    # ── train: SFTTrainer, DPOTrainer / KTOTrainer or RewardTrainer; each checks its launch at step 0 ──
    if stage == "sft":
        trainer = build_trainer(config, model, tokenizer, dataset, run_dir, args, eval_dataset)
    elif stage == "rm":
        trainer = build_reward_trainer(config, model, tokenizer, dataset, run_dir, args, eval_dataset)
    elif stage == "grpo":
        trainer = build_grpo_trainer(
            config, model, tokenizer, dataset, run_dir, args, placement, eval_dataset
        )
    else:
        trainer = build_preference_trainer(
            config, model, tokenizer, dataset, run_dir, args, placement, eval_dataset
        )
    resume = resume_checkpoint(config, run_dir, trainer)
    if resume:
        log.info("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except CheckpointSpaceError as error:  # a full disk: what it needs and how to go on, no traceback
        print(f"\nerror: {error}", file=sys.stderr)  # on a line of its own, after the progress bar
        sys.exit(1)
    if trainer.state.global_step < trainer.state.max_steps:
        # a stop request (SIGTERM, USR1, the stop file; train/run/checkpoints.py): the checkpoint is the
        # output
        if trainer.is_world_process_zero():
            log.info(
                "stopped at step %d of %d; resume with training.resume_from_checkpoint=latest",
                trainer.state.global_step,
                trainer.state.max_steps,
            )
        return None

    # ── save: adapter (or full weights), tokenizer, loss curve ─────────────────
    trainer.save_model(str(final_dir(run_dir, config.method.name)))
    if trainer.is_world_process_zero():
        plot_loss(run_dir / METRICS_FILE, run_dir / LOSS_PLOT_FILE)
        log.info("done: %s", run_dir)
    return objective(trainer.state.log_history, stage)


if __name__ == "__main__":
    main()
