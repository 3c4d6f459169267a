"""The TRL trainer for a run: its arguments from ``training.*`` (same names) plus what the device decides,
SFTTrainer for stage=sft (train/run/preference.py has DPO/KTO), and what every stage's run attaches to it."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import trl
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy
from trl import SFTConfig, SFTTrainer

from train.config import STAGE_SETTINGS, TRL_CONFIGS, Config, generation_batch_size, trl_settings
from train.model.build import attention_implementation, build_peft_config
from train.model.fast_path import fast_path
from train.model.placement import ReleaseLoadingMemory, shard_with_fsdp_on_cpu
from train.model.quantized_loading import QUANTIZED_LOAD, LoadQuantizedShards
from train.plan.architecture import LINEARS
from train.run.checkpoints import CompleteCheckpoints, out_of_space, resume_point, space_error
from train.run.launch_check import LaunchCheck
from train.run.outputs import METRICS_FILE, MetricsJsonl
from train.run.run_dir import CHECKPOINTS_DIR
from train.run.samples import SAMPLES_FILE, SampleGenerations, sample_prompts
from train.run.state_bytes import StateBytes


def training_args(config: Config, run_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    """``training.*`` (and ``stage.*`` for dpo/kto) mapped by name onto the stage's TRL config:
    ``SFTConfig``, ``DPOConfig`` or ``KTOConfig`` (which have no packing), the typed settings and those passed
    through (``train.config.trl_settings``); precision, device and the fast path's ``auto`` switches
    (train/model/fast_path.py; ConfigError for one that cannot run here) follow the device. Built before the
    model: creating it creates accelerate's state (train/model/placement.py)."""
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
    # could leave no complete one. train/run/checkpoints.py rotates after the marker, by step, complete ones
    # only.
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
    if stage == "grpo":  # GRPOConfig bounds completions (stage.max_completion_length), not whole rows
        for not_grpo in ("max_length", "activation_offloading"):
            training.pop(not_grpo, None)
        if config.stage.use_vllm:
            settings["vllm_mode"] = "colocate"  # vLLM in each training process, sharing its GPU
        if not {"generation_batch_size", "steps_per_generation"} & training.keys():  # else TRL's, from those
            settings["generation_batch_size"] = generation_batch_size(config)  # whole groups
        world = config.launch.num_processes * config.launch.num_machines
        # evaluation generates whole groups too (TRL: the global eval batch divisible by num_generations)
        evaluated = training["per_device_eval_batch_size"] * world
        training["per_device_eval_batch_size"] = math.lcm(evaluated, config.stage.num_generations) // world
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
    """Mixed into every stage's trainer: FSDP shards on CPU too (``shard_with_fsdp_on_cpu``), the final save
    streams one tensor at a time while checkpoints stay sharded, and LoRA+ builds the optimizer
    (``create_optimizer``). ``watch_run`` sets what these read: ``loraplus_lr_ratio``, ``initial_adapter``."""

    loraplus_lr_ratio: float | None = None  # method.loraplus_lr_ratio
    initial_adapter: dict[str, torch.Tensor] | None = None  # PiSSA/OLoRA's A0 and B0 (``initial_lora``)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = self.is_fsdp_enabled or shard_with_fsdp_on_cpu(self.accelerator, self.args)

    def create_optimizer(self, model=None):
        """With ``loraplus_lr_ratio`` (LoRA+), peft's ``create_loraplus_optimizer``: the run's optimizer
        (``training.optim`` with its learning rate, betas, epsilon, as Trainer builds it), B matrices and
        DoRA's magnitude vectors at ``learning_rate x ratio``, ``training.weight_decay`` on every group that
        peft decays. Trainer calls this where it builds its own optimizer, so every launch takes it: before
        FSDP2 shards the model (accelerate then swaps each parameter for its shard, keeping the groups) and
        as DeepSpeed's client optimizer (``deepspeed_optim_sched``; under ZeRO offload accelerate turns it
        into DeepSpeedCPUAdam with the same groups). Without a ratio, Trainer's own."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer
        from transformers.trainer_optimizer import is_optimizer_factory

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
            raise ValueError(
                f"training.optim={self.args.optim} builds its own parameter groups; LoRA+ "
                "(method.loraplus_lr_ratio) needs an optimizer class, such as adamw_torch"
            )
        kwargs = dict(kwargs)
        self.optimizer = create_loraplus_optimizer(
            opt_model, optimizer_cls, lr=kwargs.pop("lr"), loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay, **kwargs,
        )  # fmt: skip
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) stay Trainer's, sharded. The final ``adapter/`` or ``model/`` is
        written by ``train.model.sharded_save``, one tensor gathered at a time, so no process ever holds the
        whole model (FSDP's FULL_STATE_DICT, DeepSpeed's 16-bit consolidation would put all of it on rank
        0)."""
        from train.model.sharded_save import MAX_SHARD_SIZE, save_final

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _internal_call:
            max_shard_size = getattr(self, "max_shard_size", MAX_SHARD_SIZE)  # training.max_shard_size
            tokenizer = self.processing_class
            output_dir = output_dir or self.args.output_dir
            save_final(model, output_dir, args=self.args, tokenizer=tokenizer, max_shard_size=max_shard_size)
            if self.initial_adapter is not None and self.args.should_save:
                as_plain_lora(Path(output_dir), self.initial_adapter)
            return
        if self.is_deepspeed_enabled and isinstance(model, PreTrainedModel):
            zero = self.accelerator.deepspeed_config["zero_optimization"]["stage"]
            if zero == 3 and not self.model_wrapped.zero_gather_16bit_weights_on_model_save():
                # Trainer would write a DeepSpeed checkpoint here, then the same again with the optimizer's
                # states (_save_optimizer_and_scheduler): that second one is the checkpoint resume reads
                return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        """A full disk stops the run with what it needs (train/run/checkpoints.py), not a torch traceback."""
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
    bf16 matmuls are also ~200x slower. Compute stays in the run's dtype (autocast, peft's input casts).
    Also any adapter model's ``method.modules_to_save``: peft copies those modules as they are (bf16 on a
    GPU) and upcasts only its tuner layers (peft tuners_utils.py ``cast_adapter_dtype``)."""
    if getattr(model, "is_loaded_in_4bit", False) or isinstance(model, PeftModel):
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()


def keep_4bit_weights_unpacked_for_dora(model) -> None:
    """QLoRA with DoRA on a CPU: bitsandbytes repacks a ``Linear4bit``'s codes for its AVX512-BF16 inference
    kernel at the first forward without gradients (evaluation, samples; bitsandbytes 0.50 nn/modules.py
    ``Linear4bit.forward``), and peft's DoRA then dequantizes the repacked bytes as NF4 codes for its weight
    norm (peft tuners/lora/dora.py ``DoraLinearLayer.forward``, ``dequantize_module_weight``): measured on the
    tiny model, logits 4.4 off after one evaluation, for the rest of the run. Off for the layers DoRA
    adapts; plain QLoRA keeps bitsandbytes' kernel. No-op on a GPU, where bitsandbytes never repacks."""
    for module in model.modules():
        if getattr(module, "lora_magnitude_vector", None):
            base = module.get_base_layer()
            if hasattr(base, "support_avx512bf16_for_cpu"):
                base.support_avx512bf16_for_cpu = False


def initial_lora(model) -> dict[str, torch.Tensor]:
    """The A and B matrices a PiSSA/OLoRA adapter starts from, as peft saves them (``as_plain_lora``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {
        name: t.detach().to("cpu", copy=True)
        for name, t in state.items()
        if ".lora_A." in name or ".lora_B." in name
    }


def as_plain_lora(adapter_dir: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a PiSSA/OLoRA ``adapter/`` as a plain LoRA adapter of rank 2r for the unchanged base, as peft's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does (peft 0.21 peft_model.py
    save_pretrained, tuners/lora/model.py ``subtract_mutated_init``): the run trained W_res + s BA with
    W_res = W - s B0A0, so W + s (BA - B0A0) = W + s [B | -B0] [A ; A0] is the same model on W; the rank
    doubles, alpha doubles (x sqrt 2 under rsLoRA) to keep s. DoRA's magnitudes and ``modules_to_save``
    carry over as they are. Any tool that applies LoRA to the base (peft without re-running the
    decomposition, merges, servers) then reads it right."""
    import json
    import math

    from safetensors.torch import load_file, save_file

    weights_file, config_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    tensors = load_file(weights_file)
    for name, tensor in tensors.items():
        if ".lora_A." in name:
            tensors[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            tensors[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config = json.loads(config_file.read_text())
    scale = math.sqrt(2) if config.get("use_rslora") else 2
    config.update(init_lora_weights=True, r=2 * config["r"], lora_alpha=scale * config["lora_alpha"])
    for pattern, factor in (("rank_pattern", 2), ("alpha_pattern", scale)):
        config[pattern] = {key: factor * value for key, value in (config.get(pattern) or {}).items()}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    return stage_trainer(
        LlamaSFTTrainer, config, run_dir, args, eval_dataset, model=model, train_dataset=dataset,
        processing_class=tokenizer, peft_config=build_peft_config(config.method),
        cpu_fused_lm_head=config.training.cpu_fused_lm_head,
    )  # fmt: skip


def stage_trainer(
    trainer_class: type[Trainer],
    config: Config,
    run_dir: Path,
    args: TrainingArguments,
    eval_dataset: Dataset | None,
    **arguments,
) -> Trainer:
    """``trainer_class(args=args, eval_dataset=eval_dataset, **arguments)`` as every stage builds it:
    wandb's settings first when the run reports there, evaluation only with rows to evaluate on
    (``evaluates_on``), each log to ``metrics.jsonl``, and what ``watch_run`` attaches."""
    if "wandb" in config.training.report_to:
        configure_wandb(config, run_dir)
    evaluates_on(eval_dataset, args)
    trainer = trainer_class(
        args=args, eval_dataset=eval_dataset, callbacks=[MetricsJsonl(run_dir / METRICS_FILE)], **arguments
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
    trainer.loraplus_lr_ratio = config.method.loraplus_lr_ratio  # ShardedOnCpu.create_optimizer
    if isinstance(trainer.model, PeftModel):
        adapter = trainer.model.active_peft_config
        if str(adapter.init_lora_weights).lower().startswith(("pissa", "olora")):
            trainer.initial_adapter = initial_lora(trainer.model)  # the final adapter/ as a plain LoRA
        if adapter.use_dora and not torch.cuda.is_available():
            keep_4bit_weights_unpacked_for_dora(trainer.model)
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
    # a reward model says nothing; GRPO writes its own completions (train.run.grpo.CompletionSamples)
    if trainer.eval_dataset is not None and config.stage.name not in ("rm", "grpo"):
        prompts = sample_prompts(config.samples, trainer.eval_dataset, trainer.processing_class)
    if prompts:
        trainer.add_callback(
            SampleGenerations(trainer, prompts, run_dir / SAMPLES_FILE, config.samples.max_new_tokens)
        )
    return trainer


def resume_checkpoint(config: Config, run_dir: Path, trainer: Trainer) -> str | None:
    """``training.resume_from_checkpoint``: a directory, or ``latest``: this run's newest complete one whose
    files still match what was written (train/run/checkpoints.py ``resume_point``)."""
    resume = config.training.resume_from_checkpoint
    if resume == "latest":
        latest = resume_point(run_dir / CHECKPOINTS_DIR, trainer.accelerator)
        return str(latest) if latest else None
    return resume
