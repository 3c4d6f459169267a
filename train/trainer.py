"""The TRL trainer for a run: its arguments from ``training.*`` (same names) plus what the device decides,
SFTTrainer for stage=sft (train/preference.py has DPO/KTO), and what every stage's run attaches to it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy
from trl import SFTConfig, SFTTrainer

from train.checkpoints import CompleteCheckpoints, out_of_space, resume_point, space_error
from train.config import STAGE_SETTINGS, TRL_CONFIGS, Config, trl_settings
from train.fast_path import fast_path
from train.launch_check import LaunchCheck
from train.model import attention_implementation, build_peft_config
from train.outputs import METRICS_FILE, MetricsJsonl
from train.placement import ReleaseLoadingMemory, shard_with_fsdp_on_cpu
from train.plan.architecture import LINEARS
from train.quantized_loading import QUANTIZED_LOAD, LoadQuantizedShards
from train.run_dir import CHECKPOINTS_DIR
from train.samples import SAMPLES_FILE, SampleGenerations, sample_prompts
from train.state_bytes import StateBytes


def training_args(config: Config, run_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    """``training.*`` (and ``stage.*`` for dpo/kto) mapped by name onto the stage's TRL config:
    ``SFTConfig``, ``DPOConfig`` or ``KTOConfig`` (which have no packing), the typed settings and those passed
    through (``train.config.trl_settings``); precision, device and the fast path's ``auto`` switches
    (train/fast_path.py; ConfigError for one that cannot run here) follow the device. Built before the
    model: creating it creates accelerate's state (train/placement.py)."""
    stage = config.stage.name
    training = trl_settings(config.training)
    for not_trl_config in (
        "resume_from_checkpoint",
        "cpu_fused_lm_head",
        "max_shard_size",
        "checkpoint_checksums",
    ):
        training.pop(not_trl_config)
    # Trainer would rotate checkpoints before the COMPLETE marker is written (by mtime): a kill in between
    # could leave no complete one. train/checkpoints.py rotates after the marker, by step, complete ones only.
    training["save_total_limit"] = None
    settings = {key: getattr(config.stage, key) for key, stages in STAGE_SETTINGS.items() if stage in stages}
    if "eval_strategy" not in training:  # evaluate when there is something to evaluate on (data.eval_*)
        training["eval_strategy"] = "steps" if config.data.eval_split or config.data.eval_path else "no"
    use_cpu = not torch.cuda.is_available()
    cp = config.launch.cp_size
    path = fast_path(config.training, stage, attention_implementation(config.model.attn_implementation),
                     on_gpu=not use_cpu, context_parallel=cp)  # fmt: skip
    training.update(path.trl_settings())  # auto resolved for this device
    if cp > 1:  # torch's context parallelism splits each sequence into 2 x cp_size chunks (load balancing)
        training["pad_to_multiple_of"] = 2 * cp
    logging.getLogger("train").info(path.describe())
    if stage != "sft":
        for sft_only in ("packing", "packing_strategy"):
            training.pop(sft_only)
    # DDP: transformers asks for find_unused_parameters=True for any model that is not a PreTrainedModel (a
    # PeftModel) or runs without checkpointing (trainer.py, _build_accelerator_args): an extra traversal of
    # the autograd graph every step. Every trainable parameter here gets a gradient each step: full weights,
    # and adapters on decoder Linears, whose forward always runs (DPO's "ref" adapter and KTO's KL pass run
    # under no_grad, which DDP does not track). Not so for an adapter on lm_head: TRL's fused LM head (GPU)
    # reads lm_head.weight and skips the adapter. A regex target_modules keeps transformers' choice too.
    targets = config.method.target_modules  # None: peft's default for Llama, q_proj and v_proj
    decoder_only = targets == "all-linear" or (  # peft's all-linear leaves out the output layer
        not isinstance(targets, str) and set(targets or ()) <= set(LINEARS)
    )
    if config.method.name == "full" or decoder_only:
        training.setdefault("ddp_find_unused_parameters", False)
    if use_cpu:
        # accelerate 1.15 imports deepspeed wherever it unwraps a model (utils/other.py,
        # extract_model_from_parallel), DeepSpeed run or not, and deepspeed then warns "Setting accelerator to
        # CPU" when it finds no GPU. This run computes on CPU: say so first. Never over the user's own value.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return getattr(trl, TRL_CONFIGS[stage])(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
        run_name=run_dir.name,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU runs: accelerate must not pick a GPU backend, and DDP over gloo needs it (see launch/).
        use_cpu=use_cpu,
        # transformers 5.25's name for gradient_checkpointing, which it still sets from this (TRL reads it)
        activation_checkpointing=config.model.gradient_checkpointing,
        **training,
        **settings,
    )


def configure_wandb(config: Config, run_dir: Path) -> None:
    """wandb reads its settings from the environment; offline needs no account and no network."""
    os.environ["WANDB_MODE"] = config.wandb.mode
    os.environ["WANDB_PROJECT"] = config.wandb.project
    os.environ["WANDB_DIR"] = str(run_dir)
    if config.wandb.entity:
        os.environ["WANDB_ENTITY"] = config.wandb.entity


class ShardedOnCpu(Trainer):
    """Mixed into every stage's trainer: FSDP shards on CPU too (``shard_with_fsdp_on_cpu``), and the
    final save streams one tensor at a time while checkpoints stay sharded."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = self.is_fsdp_enabled or shard_with_fsdp_on_cpu(self.accelerator, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) stay Trainer's, sharded. The final ``adapter/`` or ``model/`` is
        written by ``train.sharded_save``, one tensor gathered at a time, so no process ever holds the whole
        model (FSDP's FULL_STATE_DICT, DeepSpeed's 16-bit consolidation would put all of it on rank 0)."""
        from train.sharded_save import MAX_SHARD_SIZE, save_final

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _internal_call:
            max_shard_size = getattr(self, "max_shard_size", MAX_SHARD_SIZE)  # training.max_shard_size
            tokenizer = self.processing_class
            save_final(model, output_dir or self.args.output_dir, args=self.args, tokenizer=tokenizer,
                       max_shard_size=max_shard_size)  # fmt: skip
            return
        if self.is_deepspeed_enabled and isinstance(model, PreTrainedModel):
            zero = self.accelerator.deepspeed_config["zero_optimization"]["stage"]
            if zero == 3 and not self.model_wrapped.zero_gather_16bit_weights_on_model_save():
                # Trainer would write a DeepSpeed checkpoint here, then the same again with the optimizer's
                # states (_save_optimizer_and_scheduler): that second one is the checkpoint resume reads
                return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        """A full disk stops the run with what it needs (train/checkpoints.py), not a torch traceback."""
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if not out_of_space(error, checkpoint.parent):
                raise
            raise space_error(checkpoint, error, self.is_world_process_zero()) from error


class LlamaSFTTrainer(ShardedOnCpu, SFTTrainer):
    """TRL's SFTTrainer, with the model's own cross-entropy on CPU.

    TRL scores the LM head with a chunked kernel that is a fused Triton kernel on GPU but a
    plain-torch fallback on CPU, about 3× slower there than the model's own loss with the
    128,256-token vocabulary (docs/benchmarks.md). On CPU the loss is therefore the
    model's own (same value, same ``num_items_in_batch`` normalisation, from transformers'
    ``Trainer``); the fused kernel's extra metrics (entropy, token accuracy) are GPU-only.

    Under FSDP it also shards on CPU (``shard_with_fsdp_on_cpu``), and its final save streams one
    tensor at a time while its checkpoints stay sharded (``ShardedOnCpu``).
    """

    def __init__(self, *args, cpu_fused_lm_head: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_loss = self.args.use_cpu and not cpu_fused_lm_head
        keep_adapters_fp32(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model_loss:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def keep_adapters_fp32(model) -> None:
    """Undo TRL's cast of a quantized model's adapter to bf16 (every TRL trainer does it in __init__, citing
    the QLoRA paper): trainable weights keep an fp32 master copy on every device (docs/memory.md). In bf16 a
    LoRA weight of ~0.016 moves in steps of ~6e-5, so updates of ~lr (DPO's 5e-6) would be lost; on CPU
    bf16 matmuls are also ~200x slower. Compute stays in the run's dtype (autocast, peft's input casts)."""
    if getattr(model, "is_loaded_in_4bit", False):
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()


def build_trainer(
    config: Config,
    model,
    tokenizer,
    dataset: Dataset,
    run_dir: Path,
    args: SFTConfig,
    eval_dataset: Dataset | None = None,
) -> SFTTrainer:
    """TRL's SFTTrainer on the encoded dataset; it folds ``assistant_masks`` into the labels itself."""
    if "wandb" in config.training.report_to:
        configure_wandb(config, run_dir)
    evaluates_on(eval_dataset, args)
    trainer = LlamaSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(config.method),
        callbacks=[MetricsJsonl(run_dir / METRICS_FILE)],
        cpu_fused_lm_head=config.training.cpu_fused_lm_head,
    )
    return watch_run(trainer, config, run_dir)


def evaluates_on(eval_dataset: Dataset | None, args: TrainingArguments) -> None:
    """``args`` evaluate only with rows to evaluate on: ``training_args`` turns evaluation on from the config
    (data.eval_split / eval_path), before any data exists; a caller with rows of its own may have none."""
    if eval_dataset is None:
        args.eval_strategy, args.do_eval = IntervalStrategy.NO, False


def watch_run(trainer: Trainer, config: Config, run_dir: Path) -> Trainer:
    """Attach what every stage's run needs besides its metrics: at step 0 the host memory loading freed is
    given back and the launch is checked; checkpoints are marked COMPLETE, and a stop request (SIGTERM, USR1,
    the stop file) checkpoints and stops; each rank writes what it holds after the first step."""
    trainer.max_shard_size = config.training.max_shard_size  # the final model/ (ShardedOnCpu.save_model)
    pending = getattr(trainer.model, QUANTIZED_LOAD, None)
    if pending is not None:  # QLoRA under FSDP/ZeRO-3: the 4-bit weights into each rank's shard, first
        trainer.add_callback(LoadQuantizedShards(pending, trainer.args.device))
    trainer.add_callback(ReleaseLoadingMemory())
    trainer.add_callback(LaunchCheck(trainer, config.launch))
    training = config.training
    trainer.add_callback(
        CompleteCheckpoints(trainer, run_dir, training.save_total_limit, training.checkpoint_checksums)
    )
    trainer.add_callback(StateBytes(run_dir))  # state_bytes/rank<k>.json: what each rank holds after step 1
    prompts = []  # samples.jsonl: what the model says at each eval and at the end (samples.count=0: nothing)
    if trainer.eval_dataset is not None:
        prompts = sample_prompts(config.samples, trainer.eval_dataset, trainer.processing_class)
    if prompts:
        trainer.add_callback(
            SampleGenerations(trainer, prompts, run_dir / SAMPLES_FILE, config.samples.max_new_tokens)
        )
    return trainer


def resume_checkpoint(config: Config, run_dir: Path, trainer: Trainer) -> str | None:
    """``training.resume_from_checkpoint``: a directory, or ``latest``: this run's newest complete one whose
    files still match what was written (train/checkpoints.py ``resume_point``)."""
    resume = config.training.resume_from_checkpoint
    if resume == "latest":
        latest = resume_point(run_dir / CHECKPOINTS_DIR, trainer.accelerator)
        return str(latest) if latest else None
    return resume
