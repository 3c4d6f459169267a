"""The structured config schema: Hydra composes ``conf/`` into these dataclasses.

Types and unknown keys are checked by Hydra/OmegaConf at composition; ``validate``
checks what spans fields and reports every problem at once, each with its key and fix.
Numbers live in ``conf/``; fields without a sensible universal value are ``MISSING``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from data.config import (
    CHAT_FORMATS,
    MESSAGES_FIELDS,
    DataConfig,
    sample_path,
    source_exists,
    source_problems,
    sources_of,
)
from train.run.run_dir import CONFIG_FILE, run_config

METHODS = ("full", "lora", "qlora")
STAGES = ("sft", "dpo", "kto", "rm", "grpo")
# The stages that start from the base or a finished run's weights, an adapter run merged into its base
# (train.run.preference.fresh_start), never from an adapter that goes on training
FRESH_START_STAGES = ("rm", "grpo")
# What each stage trains on (data.readers.FORMATS, data.preference.PREFERENCE_FORMATS): OpenAssistant trees
# give chat threads to SFT and ranked reply pairs to DPO/KTO/RM; KTO also takes pairs, unpaired as TRL does.
STAGE_FORMATS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "oasst_messages", "oasst_trees",
            "oasst_top1", "guanaco"),
    "dpo": ("preference", "oasst_messages", "oasst_trees"),
    "kto": ("kto", "preference", "oasst_messages", "oasst_trees"),
    "rm": ("preference", "oasst_messages", "oasst_trees"),
    # prompts: a prompt file (data.prompts); a chat source gives each conversation up to its last reply
    "grpo": ("prompts", "messages", "sharegpt", "alpaca", "prompt_completion", "oasst_messages",
             "oasst_trees", "oasst_top1", "guanaco"),
}  # fmt: skip
# Stage settings under TRL's DPOConfig / KTOConfig / GRPOConfig names, and the stages that have each.
STAGE_SETTINGS = {
    "beta": ("dpo", "kto", "grpo"),
    "loss_type": ("dpo", "kto", "grpo"),
    "label_smoothing": ("dpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "num_generations": ("grpo",),
    "max_completion_length": ("grpo",),
    "temperature": ("grpo",),
    "use_vllm": ("grpo",),
}
# The TRL config each stage's ``training.*`` becomes (train/run/trainer.py), by name: trl takes seconds to
# import, so it is imported only where a key needs it.
TRL_CONFIGS = {
    "sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "rm": "RewardConfig", "grpo": "GRPOConfig"
}  # fmt: skip
# Fields of those configs that the run sets from another key, and that key (and stage.* of STAGE_SETTINGS, for
# the stages that have each: SFTConfig has a loss_type of its own).
SET_BY_THE_RUN = {
    "output_dir": "hydra.run.dir (the run directory)",
    "run_name": "hydra.run.dir (the run directory)",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "use_cpu": "the device: CPU exactly when no GPU is visible (CUDA_VISIBLE_DEVICES)",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "activation_checkpointing": "model.gradient_checkpointing",
}
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# Fields of peft's LoraConfig that the run sets itself (train/model/build.py build_peft_config, peft's save),
# and from what.
LORA_SET_BY_THE_RUN = {
    "task_type": "stage.name (a causal LM: CAUSAL_LM; stage=rm, a reward model: SEQ_CLS)",
    "peft_type": "method.name (LoRA)",
    "inference_mode": "the stage (it trains; peft saves the adapter with inference_mode true)",
    "base_model_name_or_path": "model.path (peft records it when it saves)",
    "revision": "model.path (weights come from a local directory, never a Hub revision)",
    "auto_mapping": "peft, when it saves",
    "peft_version": "peft, when it saves",
}
# init_lora_weights (peft 0.21, LoraConfig): values that draw the adapter at random, values that decompose the
# base weight when peft wraps the model (pissa and olora then change it to the residual W - scale x B0 A0),
# and values a run cannot give what they need, with the reason.
RANDOM_INITS = ("true", "false", "gaussian", "orthogonal")
BASE_INITS = ("pissa", "olora", "mica")  # and pissa_niter_<n>: a fast, randomized SVD with n iterations
UNRUNNABLE_INITS = {
    "loftq": "LoftQ replaces the base weights by their own 4-bit quantization and fits the adapter to that "
    "base, which peft's workflow then saves as a new base model; a run trains and saves against model.path's "
    "weights (for QLoRA use init_lora_weights=true or gaussian)",
    "eva": "EVA initializes from an SVD of each layer's inputs over the data (peft's "
    "initialize_lora_eva_weights), a pass a run does not make",
    "corda": "CorDA needs peft's preprocess_corda over the data first, a pass a run does not make",
    "lora_ga": "LoRA-GA needs peft's preprocess_loraga (gradients over the data) first, a pass a run does "
    "not make",
}
# training.optim families whose transformers handler builds its own parameter groups (GaLore, APOLLO: params /
# optimizer_dict) or takes the model (LOMO), so they cannot take LoRA+'s groups (transformers 5.25
# trainer_optimizer.py)
OWN_PARAMETER_GROUPS = ("galore", "apollo", "lomo")


@dataclass
class RopeScaling:
    """Llama 3.1's ``llama3`` rope scaling (Meta's ``use_scaled_rope``)."""

    rope_type: str = "llama3"
    factor: float = MISSING
    low_freq_factor: float = MISSING
    high_freq_factor: float = MISSING
    original_max_position_embeddings: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str | None = None  # local checkpoint directory; None builds random weights from the architecture
    tokenizer_path: str | None = None  # None: model.path if set, else the llama-models tokenizer
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU (no fast bf16 there)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed and on a GPU, else sdpa
    gradient_checkpointing: bool = MISSING  # recompute activations in backward: on for 8B and up
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING
    rms_norm_eps: float = MISSING
    rope_theta: float = MISSING
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    initializer_range: float = MISSING  # std of random initial weights; used only without model.path
    chat_format: str = "llama3.1"  # the official Instruct template trained: llama3.1 (3.1, 3.3) or llama3.2


@dataclass
class MethodConfig:
    """full, lora or qlora; LoRA fields use peft's ``LoraConfig`` names.

    Typed here: the fields the project itself uses. Any other field of ``LoraConfig`` passes through under
    its own name (``method.use_dora=true``, ``method.init_lora_weights=pissa``): the node is open
    (``open_method``) and ``lora_pass_through_problems`` checks such keys against peft's dataclass.
    ``lora_settings`` gives every LoraConfig setting; ``adapter_problems`` what peft or a launch cannot run.
    """

    name: str = MISSING
    r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: Any = None  # a list of module names, or "all-linear"
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # bitsandbytes' BitsAndBytesConfig names
    bnb_4bit_use_double_quant: bool = True
    # LoRA+ (peft's create_loraplus_optimizer): B matrices and DoRA's magnitudes learn at learning_rate x
    # this; None: one learning rate for the whole adapter
    loraplus_lr_ratio: float | None = None


def open_method() -> DictConfig:
    """The ``method`` node of the schema, typed but open to keys it does not declare, as ``open_training``:
    any field of peft's ``LoraConfig`` is set like any other (``method.use_dora=true``)."""
    node = OmegaConf.structured(MethodConfig)
    OmegaConf.set_struct(node, False)
    return node


@dataclass
class SlurmConfig:
    """``launch=slurm``: the sbatch job that ``python -m launch`` writes; ``None``: the cluster decides."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. h100
    time: str = MISSING  # the job's time limit, Slurm's format ("D-HH:MM:SS", "HH:MM:SS")
    cpus_per_task: int = MISSING  # CPU cores per node (one task per node runs all its GPUs' processes)
    mem: str | None = None  # memory per node, e.g. "0" (all of it) or "500G"; None: the partition's default
    # USR1 this long before the time limit: checkpoint, then requeue; None: the checkpoint's size (the
    # planner's checkpoint_bytes) at checkpoint_write_gb_per_s, plus signal_margin_seconds
    signal_seconds: int | None = None
    checkpoint_write_gb_per_s: float = MISSING  # the run directory's file system, all nodes together
    signal_margin_seconds: int = MISSING  # beyond the write: the step in flight, the stop, the requeue
    job_name: str = MISSING
    sbatch_extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--exclusive"
    setup: list[str] = field(default_factory=list)  # shell lines run first: module load, env vars
    python: str | None = None  # the interpreter on the nodes; None: the one that ran `python -m launch`
    # a crash (a node's processes killed, a lost node) after this start saved a newer complete checkpoint:
    # requeue, and go on from it; a crash without progress is left to a person
    requeue_on_failure: bool = MISSING


@dataclass
class LaunchConfig:
    name: str = MISSING
    strategy: str = MISSING  # single, ddp, fsdp, zero2, zero3, zero3_offload: how weights and states spread
    num_processes: int = 1  # processes (GPUs) on each machine
    num_machines: int = 1
    gpu_memory_gb: float = MISSING  # memory of one GPU, for the planner's fit check
    accelerate_config: str | None = None  # a file under launch/, for `accelerate launch --config_file`
    run: bool = False  # python -m launch: start the command (true) or only print it (false)
    nodes: int | None = None  # launch=slurm: nodes of the job (num_machines follows it)
    gpus_per_node: int | None = None  # launch=slurm: GPUs per node (num_processes follows); 0: a CPU job
    slurm: SlurmConfig | None = None  # launch=slurm: the sbatch job
    cp_size: int = 1  # context parallelism: each sequence split over this many GPUs (FSDP2, SFT, a GPU)


@dataclass
class TrainingConfig:
    """Settings passed to TRL's ``SFTConfig`` (stage=dpo/kto: ``DPOConfig``/``KTOConfig``) by name.

    Typed here: the fields the project itself uses and documents. Any other field of the stage's TRL config
    passes through under its own name (``training.ddp_timeout=600``): the node is open (``open_training``)
    and ``pass_through_problems`` checks such keys against TRL's dataclass. ``trl_settings`` gives them all.
    """

    seed: int = MISSING
    max_steps: int = MISSING
    num_train_epochs: float = MISSING
    per_device_train_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_steps: float = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    optim: str = MISSING
    max_length: int = MISSING
    packing: str = "auto"  # auto: packed on a GPU (SFT), not on a CPU; true, false (train/model/fast_path.py)
    packing_strategy: str = MISSING  # bfd: best-fit decreasing; packed sequences never attend to each other
    use_liger_kernel: str = "auto"  # auto: Liger's RMSNorm/RoPE/SwiGLU kernels where a GPU and liger are
    activation_offloading: bool = False  # TRL: kept activations to CPU memory (GPU only), for long context
    logging_steps: int = MISSING
    save_steps: int = MISSING
    eval_steps: int = MISSING  # with data.eval_split/eval_path: eval loss every this many steps and at end
    per_device_eval_batch_size: int = MISSING  # conf: the training batch (TRL's 8 holds 4x a step's logits)
    save_total_limit: int | None = None  # complete checkpoints kept; older go once a newer is complete
    checkpoint_checksums: bool = True  # each checkpoint file's CRC-32 (sizes always), checked at resume
    report_to: list[str] = field(default_factory=list)
    dataloader_num_workers: int = 0
    include_num_input_tokens_seen: str = "non_padding"  # counts tokens, for tokens/s in metrics and sweeps
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in this run's directory
    cpu_fused_lm_head: bool = False  # CPU only: TRL's chunked LM-head kernel instead of the model's own loss
    max_shard_size: str = "5GB"  # the final model/ and exports: safetensors files of at most this size


def open_training() -> DictConfig:
    """The ``training`` node of the schema, typed but open to keys it does not declare (OmegaConf lets a typed
    node take new keys when its own struct flag is False, even under Hydra's struct root), so a TRL field
    that ``TrainingConfig`` lacks is set like any other, in a file, on the command line, in a run's saved
    config.yaml. ``OmegaConf.to_object`` makes such keys attributes of the ``TrainingConfig``."""
    node = OmegaConf.structured(TrainingConfig)
    OmegaConf.set_struct(node, False)
    return node


@dataclass
class StageConfig:
    """What trains: ``sft`` (TRL's SFTTrainer), ``dpo`` (DPOTrainer), ``kto`` (KTOTrainer), ``rm`` (a reward
    model: RewardTrainer) or ``grpo`` (online RL: GRPOTrainer).

    The stage settings are ``DPOConfig``/``KTOConfig``/``GRPOConfig`` fields under their own names
    (``STAGE_SETTINGS``); None where the stage has no such setting. ``rewards`` (grpo): the reward functions,
    each ``{_target_: <import path>, weight: <float>, <its keyword arguments>}`` (train/run/rewards.py).
    """

    name: str = "sft"  # a default, not MISSING: run directories written before stages existed are sft runs
    init_from: str | None = None  # all but sft: a finished run directory (its adapter/ or model/)
    init_config: str | None = None  # the config.yaml of init_from's run, resolved from it (a record)
    beta: float | None = None
    loss_type: Any = None  # dpo: a list of DPOConfig loss types; kto: kto or apo_zero_unpaired
    label_smoothing: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    num_generations: int | None = None  # grpo: completions sampled per prompt (one group)
    max_completion_length: int | None = None  # grpo: tokens a completion may take
    temperature: float | None = None  # grpo: sampling temperature
    use_vllm: bool | None = None  # grpo: generate with vLLM in colocate mode (the vllm extra, a GPU)
    rewards: Any = None  # grpo: the reward functions (see above)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline needs no account and no network; `wandb sync` uploads later
    project: str = MISSING
    entity: str | None = None


@dataclass
class SamplesConfig:
    """Greedy generations at each evaluation and at the end (with data.eval_split/eval_path), written to
    samples.jsonl and wandb: ``prompts`` (user messages), or the first ``count`` held-out conversations'."""

    prompts: list[str] = field(default_factory=list)
    count: int = MISSING
    max_new_tokens: int = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=open_method)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    training: TrainingConfig = field(default_factory=open_training)
    stage: StageConfig = field(default_factory=StageConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    output_dir: str = MISSING


class ConfigError(ValueError):
    """A config that cannot work; lists every problem with its key and the fix."""


def compose_config(overrides: list[str]) -> DictConfig:
    """The config tree composed with ``overrides``, for command-line tools that are not Hydra apps
    (``python -m data.prepare``, ``python -m train.plan``): no run directory, no Hydra logging."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    ):
        return compose(config_name="config", overrides=[*overrides, "output_dir=unused"])


def run_config_path(run_dir: str | None) -> str | None:
    """``${run_config:dir}`` in configs: the absolute path of a run directory's config.yaml, or None."""
    return None if run_dir is None else str(Path(run_dir).resolve() / CONFIG_FILE)


def register_configs() -> None:
    """Make the schema the base of ``conf/config.yaml`` (its defaults list names ``schema``)."""
    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("sample", sample_path, replace=True)
    OmegaConf.register_new_resolver("run_config", run_config_path, replace=True)
    # Run files from global rank 0 only (conf/config.yaml's hydra section; the rank comes from
    # ${oc.env:RANK,0}, which torchrun sets): ${rank_zero_only:rank,value} is value on rank 0, else null;
    # ${rank_suffix:rank} is "" on rank 0, else ".rank<k>".
    OmegaConf.register_new_resolver(
        "rank_zero_only", lambda rank, value: value if int(rank) == 0 else None, replace=True
    )
    OmegaConf.register_new_resolver(
        "rank_suffix", lambda rank: "" if int(rank) == 0 else f".rank{int(rank)}", replace=True
    )


def validate(config: Config) -> list[str]:
    """Problems that span fields, each as 'key: what is wrong; the fix'. Empty when the config can run."""
    problems = []
    method, training, model = config.method, config.training, config.model
    if method.name not in METHODS:
        problems.append(f"method.name: {method.name!r} is not one of {', '.join(METHODS)}")
    if method.name in ("lora", "qlora"):
        for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
            if getattr(method, key) is None:
                problems.append(
                    f"method.{key}: required for {method.name}; set it in conf/method/{method.name}.yaml"
                )
    if method.load_in_4bit != (method.name == "qlora"):
        problems.append("method.load_in_4bit: 4-bit loading is what makes QLoRA; use method=qlora for it")
    if model.dtype not in DTYPES:
        problems.append(f"model.dtype: {model.dtype!r} is not one of {', '.join(DTYPES)}")
    if model.chat_format not in CHAT_FORMATS:
        problems.append(
            f"model.chat_format: {model.chat_format!r} is not one of {', '.join(CHAT_FORMATS)} (llama3.1 for "
            "Llama 3.1 and 3.3, llama3.2 for Llama 3.2 1B/3B)"
        )
    if training.max_length > model.max_position_embeddings:
        problems.append(
            f"training.max_length: {training.max_length} exceeds the model's context "
            f"({model.max_position_embeddings}); lower it"
        )
    if training.max_steps <= 0 and training.num_train_epochs <= 0:
        problems.append("training.max_steps: set max_steps > 0 or num_train_epochs > 0")
    for key, path in (("model.path", model.path), ("model.tokenizer_path", model.tokenizer_path)):
        if path is not None and not Path(path).is_dir():
            problems.append(
                f"{key}: {path} is not a directory; point it at a local checkpoint (nothing is downloaded)"
            )
    if (
        model.path is not None
        and Path(model.path).is_dir()
        and not any(Path(model.path).glob("*.safetensors"))
    ):
        problems.append(
            f"model.path: no *.safetensors weights in {model.path}; weights load as safetensors only "
            "(pickle files can run code): convert them, e.g. with transformers' save_pretrained"
        )
    problems += source_problems(config.data)
    for key, data in sources_of(config.data):
        if data.path is not None and not source_exists(data.path):
            problems.append(
                f"{key}.path: {data.path} is not a file, a directory, a glob that matches or "
                f"hf:<name>[:<split>]; point it at local {data.format} data (nothing is downloaded)"
            )
        if key != "data" and data.eval_split and not config.data.eval_split:
            problems.append(
                f"{key}.eval_split: the run evaluates only with data.eval_split set; set data.eval_split "
                "(each source's default; eval_split: 0 on a source holds nothing out)"
            )
        if data.threads not in ("best", "all"):
            problems.append(f"{key}.threads: {data.threads!r}; use best (one per tree) or all (every path)")
        if data.messages_field is not None and data.format not in MESSAGES_FIELDS:
            problems.append(
                f"{key}.messages_field: applies to formats {', '.join(MESSAGES_FIELDS)}, not "
                f"{data.format!r}; remove it"
            )
    if config.data.overflow not in ("truncate", "drop"):
        problems.append(f"data.overflow: {config.data.overflow!r}; use truncate or drop")
    if config.launch.strategy not in STRATEGIES:
        problems.append(f"launch.strategy: {config.launch.strategy!r} is not one of {', '.join(STRATEGIES)}")
    accelerate_config = config.launch.accelerate_config
    if (
        accelerate_config is not None
        and not (Path(__file__).resolve().parents[1] / accelerate_config).is_file()
    ):
        problems.append(f"launch.accelerate_config: {accelerate_config} does not exist in this checkout")
    if config.launch.strategy != "single" and accelerate_config is None:
        problems.append(
            f"launch.accelerate_config: launch={config.launch.name} ({config.launch.strategy}) needs an "
            "accelerate config file to start its processes; without one it can only be planned "
            "(python -m train.plan)"
        )
    problems += _launch_problems(config.launch)
    problems += adapter_problems(config)
    problems += _stage_problems(config)
    problems += _context_parallel_problems(config)
    return problems


def _context_parallel_problems(config: Config) -> list[str]:
    """``launch.cp_size``: accelerate's context parallelism (torch's ring attention over the FSDP2 mesh)
    splits each sequence over ``cp_size`` GPUs; it needs FSDP2, SDPA attention (what torch shards), whole
    unpacked sequences (it replaces the mask by ``is_causal``: TRL refuses packing) and SFT."""
    launch, cp = config.launch, config.launch.cp_size
    if cp == 1:
        return []
    if cp < 1:
        return [f"launch.cp_size: {cp}; at least 1 (1: no context parallelism)"]
    problems = []
    world = launch.num_processes * launch.num_machines
    if launch.strategy != "fsdp":
        problems.append(
            f"launch.cp_size={cp}: context parallelism runs over FSDP2 (accelerate); use launch=fsdp"
        )
    if world % cp:
        problems.append(
            f"launch.cp_size={cp}: {world} process(es) do not split into groups of {cp}; use a divisor of "
            f"{world}"
        )
    if config.stage.name != "sft":
        problems.append(f"launch.cp_size={cp}: SFT only (stage={config.stage.name}); use launch.cp_size=1")
    if switch(config.training, "packing") == "true":
        problems.append(
            f"launch.cp_size={cp}: context parallelism keeps only causal masks, so packed sequences would "
            "attend to each other; use training.packing=auto (off under context parallelism) or false"
        )
    if config.model.attn_implementation not in ("auto", "sdpa"):
        problems.append(
            f"model.attn_implementation={config.model.attn_implementation}: context parallelism shards SDPA "
            "only; use model.attn_implementation=sdpa (or auto)"
        )
    return problems


SWITCH_VALUES = ("auto", "true", "false")


def switch(training: TrainingConfig, key: str) -> str:
    """``auto``, ``true`` or ``false`` (Hydra reads ``training.packing=true`` as a bool; the field keeps it
    as the string ``True``)."""
    return str(getattr(training, key)).lower()


def switch_problems(training: TrainingConfig, stage: str) -> list[str]:
    """What is wrong whatever the device: an unknown value, packing asked of a preference stage."""
    problems = [
        f"training.{key}: {getattr(training, key)!r}; use auto (on where it runs), true or false"
        for key in ("packing", "use_liger_kernel")
        if switch(training, key) not in SWITCH_VALUES
    ]
    if stage != "sft" and switch(training, "packing") == "true":
        problems.append(f"training.packing: SFT only; stage={stage} trains on whole prompt + completion rows")
    return problems


def _stage_problems(config: Config) -> list[str]:
    """The stage against its data, settings and starting run."""
    stage, data, training = config.stage, config.data, config.training
    if stage.name not in STAGES:
        return [f"stage.name: {stage.name!r} is not one of {', '.join(STAGES)}"]
    problems = switch_problems(training, stage.name)
    for key, source in sources_of(data):
        if source.format is not None and source.format not in STAGE_FORMATS[stage.name]:
            problems.append(_format_problem(stage.name, source, key))
    if stage.name in ("sft", "grpo"):
        mined = {
            "data.pairs_per_prompt": data.pairs_per_prompt is not None,
            "data.min_rank_gap": data.min_rank_gap != 1,
        }
        problems += [
            f"{key}: mines preference pairs from OpenAssistant trees, for stage=dpo, kto or rm; remove it"
            for key, is_set in mined.items()
            if is_set
        ]
    else:
        problems += [
            f"{key}.threads: stage={stage.name} mines pairs at every prompt of a tree; remove it"
            for key, source in sources_of(data)
            if source.threads != "best"
        ]
    for key, stages in STAGE_SETTINGS.items():
        value = getattr(stage, key)
        if value is not None and stage.name not in stages:
            problems.append(
                f"stage.{key}: not a setting of stage={stage.name} (it is {', '.join(stages)}'s); remove it"
            )
        if value is None and stage.name in stages:
            problems.append(f"stage.{key}: required for {stage.name}; set it in conf/stage/{stage.name}.yaml")
    if stage.name == "kto" and stage.loss_type == "kto" and training.per_device_train_batch_size < 2:
        problems.append(
            "training.per_device_train_batch_size: KTO estimates its KL term from each prompt with another "
            "completion of the same batch, so it needs at least 2 (TRL's KTOTrainer refuses 1)"
        )
    sharded_4bit = config.method.load_in_4bit and config.launch.strategy in ("fsdp", "zero3")
    if stage.name != "sft" and sharded_4bit and str(vars(training).get("precompute_ref_log_probs")) == "True":
        problems.append(
            "training.precompute_ref_log_probs: TRL scores the reference in the trainer's constructor, "
            "before QLoRA's weights are quantized into each rank's shard at step 0 under "
            f"{config.launch.strategy} (train/model/quantized_loading.py); remove it (QLoRA's reference is "
            "its adapter disabled, scored with each batch) or use launch=ddp"
        )
    if stage.name == "grpo":
        problems += _grpo_problems(config)
    if stage.init_from is not None:
        problems += _init_problems(config)
    return problems


def _grpo_problems(config: Config) -> list[str]:
    """GRPO's reward functions (each importable, with a number as its weight), its groups (2 completions
    at least), vLLM (installed, on a GPU) and its one prompt source."""
    stage = config.stage
    problems = []
    rewards = stage.rewards
    if not isinstance(rewards, list | ListConfig) or not rewards:
        problems.append(
            "stage.rewards: name at least one reward function, e.g. "
            "[{_target_: train.run.rewards.ends_at_eot, weight: 1.0}] (train/run/rewards.py)"
        )
        rewards = []
    for index, reward in enumerate(rewards):
        key = f"stage.rewards[{index}]"
        target = reward.get("_target_") if isinstance(reward, dict | DictConfig) else None
        if not target:
            problems.append(f"{key}: give the function's import path as _target_ (and a weight)")
            continue
        try:
            function = import_target(target)
        except ImportError as error:
            problems.append(f"{key}._target_: {target} does not import ({error})")
            continue
        if not callable(function):
            problems.append(f"{key}._target_: {target} is not callable")
        weight = reward.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(f"{key}.weight: {weight!r} is not a number")
    if (stage.num_generations or 0) < 2:
        problems.append(
            f"stage.num_generations={stage.num_generations}: GRPO compares completions of the same prompt; "
            "give it at least 2 (4 to 16 is usual)"
        )
    if (stage.max_completion_length or 0) >= config.training.max_length:
        problems.append(
            f"stage.max_completion_length={stage.max_completion_length}: a prompt and its completion share "
            f"training.max_length={config.training.max_length}, which leaves no token for the prompt; raise "
            "training.max_length or lower stage.max_completion_length"
        )
    if stage.use_vllm:
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None:
            problems.append(
                "stage.use_vllm: vllm is not installed (pip install -e '.[vllm]': TRL's supported vLLM, on a "
                "CUDA machine); stage.use_vllm=false generates with transformers"
            )
        elif not torch.cuda.is_available():
            problems.append("stage.use_vllm: vLLM generates on a GPU and none is visible here")
    if config.data.sources:
        problems.append("data.sources: stage=grpo reads one prompt source (data.path) for now")
    return problems


def generation_batch_size(config: Config) -> int:
    """GRPO's completions generated at once, all processes together: ``training.generation_batch_size`` when
    given, a step's batch times ``training.steps_per_generation`` when that is, else the fewest whole steps
    that hold whole groups of ``stage.num_generations`` (TRL then takes several optimizer steps on one
    generation, its steps_per_generation)."""
    training, launch = vars(config.training), config.launch
    if training.get("generation_batch_size"):
        return training["generation_batch_size"]
    batch = training["per_device_train_batch_size"] * launch.num_processes * launch.num_machines
    if training.get("steps_per_generation"):
        return batch * training["steps_per_generation"]
    return math.lcm(batch * training["gradient_accumulation_steps"], config.stage.num_generations)


def import_target(target: str):
    """The object an import path names (Hydra's own resolution of ``_target_``)."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as error:  # Hydra wraps every failure to import in its own error
        raise ImportError(str(error).splitlines()[0]) from None


def _format_problem(stage: str, data: DataConfig, key: str = "data") -> str:
    """Why ``stage`` cannot train on ``data`` (the source ``key`` names), and what would."""
    format = data.format
    holds = {"preference": "preference pairs", "kto": "labelled completions (KTO)"}.get(format, "chats")
    other = next((name for name in STAGES if format in STAGE_FORMATS[name]), None)
    fix = f"use such data, or stage={other}" if other else f"use one of {', '.join(STAGE_FORMATS[stage])}"
    return (
        f"{key}.format: data={data.name} is {format!r}, which holds {holds}, but stage={stage} trains on "
        f"{_STAGE_DATA[stage]}; {fix}"
    )


_STAGE_DATA = {
    "sft": "chats (data=sample, or the threads of OpenAssistant trees)",
    "dpo": "preference pairs (data=preference_sample, or pairs mined from OpenAssistant trees)",
    "kto": "labelled completions (data=kto_sample) or pairs, which it unpairs",
    "rm": "preference pairs (data=preference_sample, or pairs mined from OpenAssistant trees)",
    "grpo": "prompts (data=arithmetic_sample, a prompt file, or the chats of any chat source)",
}


# What must agree between a run and the run it starts from: the architecture its weights have.
_ARCHITECTURE = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "tie_word_embeddings",
)  # fmt: skip


def _init_problems(config: Config) -> list[str]:
    """``stage.init_from``: a finished run, whose model this run's model and method can start from."""
    stage, model, method = config.stage, config.model, config.method
    start = Path(stage.init_from)
    key = "stage.init_from"
    if stage.name == "sft":
        return [f"{key}: starting from another run is for stage=dpo, kto, rm or grpo; remove it"]
    if not start.is_dir():
        return [f"{key}: {start} is not a directory; point it at a finished SFT run (outputs/<date>/<time>)"]
    if not (start / CONFIG_FILE).is_file():
        return [
            f"{key}: {start} has no config.yaml, so it is no run directory; point it at a finished SFT run"
        ]
    try:
        previous = run_config(start)
    except ConfigError as error:
        return [f"{key}: {start}/config.yaml does not load with this schema: {error}"]
    adapter, weights = start / "adapter" / "adapter_config.json", start / "model"
    if previous.method.name == "full" and not any(weights.glob("*.safetensors")):
        return [f"{key}: {start} has no model/*.safetensors; did the run finish?"]
    if previous.method.name != "full" and not adapter.is_file():
        return [f"{key}: {start} has no adapter/adapter_config.json; did the run finish?"]
    problems = [
        f"{key}: {start} trained model={previous.model.name}, {name} {getattr(previous.model, name)}, but "
        f"this run's model={model.name} has {getattr(model, name)}; use model={previous.model.name}"
        for name in _ARCHITECTURE
        if getattr(previous.model, name) != getattr(model, name)
    ]
    continues = method.name in (previous.method.name, "full")  # the adapter trains on, or is merged
    fresh = stage.name in FRESH_START_STAGES
    if fresh and previous.method.name != "full" and method.name == "qlora":
        problems.append(
            f"method=qlora: {start} trained a {previous.method.name} adapter; stage={stage.name} starts from "
            "it merged into its base, which is not quantized again here; use method=lora or full, or export "
            f"the merged model (python -m train.export run={start}) and start from it with model.path"
        )
    elif not fresh and previous.method.name != "full" and not continues:
        problems.append(
            f"method: {start} trained a {previous.method.name} adapter, which goes on training with "
            f"method={previous.method.name} (or is merged for method=full), not method={method.name}"
        )
    base = start / "model" if previous.method.name == "full" else previous.model.path
    if model.path is not None and (base is None or Path(model.path).resolve() != Path(base).resolve()):
        problems.append(
            f"model.path: {model.path}, but {start} starts this run from {base or 'random weights'}; "
            "leave model.path unset (the run it starts from brings its base)"
        )
    return problems


def _launch_problems(launch: LaunchConfig) -> list[str]:
    problems = []
    if launch.num_processes < 1 or launch.num_machines < 1:
        problems.append(
            f"launch.num_processes={launch.num_processes}, launch.num_machines={launch.num_machines}: "
            "both must be at least 1"
        )
    if launch.strategy == "single" and launch.num_processes * launch.num_machines > 1:
        problems.append("launch.strategy: single runs one process; use ddp, fsdp or a zero stage for several")
    if launch.slurm is None:
        return problems
    if launch.nodes is None or launch.nodes < 1:
        problems.append(f"launch.nodes: {launch.nodes}; a Slurm job needs at least 1 node")
    elif launch.num_machines != launch.nodes:
        problems.append(
            f"launch.num_machines: {launch.num_machines} != launch.nodes={launch.nodes}; set nodes only"
        )
    if launch.gpus_per_node is None or launch.gpus_per_node < 0:
        problems.append(f"launch.gpus_per_node: {launch.gpus_per_node}; 0 or more (0: a CPU-only job)")
    elif launch.gpus_per_node and launch.num_processes != launch.gpus_per_node:
        problems.append(
            f"launch.num_processes: {launch.num_processes} != launch.gpus_per_node={launch.gpus_per_node}; "
            "one process per GPU: set gpus_per_node only"
        )
    slurm = launch.slurm
    if slurm.signal_seconds is not None and slurm.signal_seconds < 1:
        problems.append(
            "launch.slurm.signal_seconds: must be > 0 (or null: sized from the checkpoint), or the job is "
            "never warned before its limit"
        )
    if slurm.checkpoint_write_gb_per_s <= 0 or slurm.signal_margin_seconds < 0:
        problems.append(
            f"launch.slurm.checkpoint_write_gb_per_s={slurm.checkpoint_write_gb_per_s}, "
            f"signal_margin_seconds={slurm.signal_margin_seconds}: a write speed > 0 GB/s and a margin >= 0 s"
        )
    return problems


def trl_settings(training: TrainingConfig) -> dict[str, Any]:
    """Every ``training.*`` setting by name: the typed fields and the keys passed through to TRL's config."""
    return dict(vars(training))


def pass_through_problems(training: TrainingConfig, stage: str) -> list[str]:
    """The ``training.*`` keys ``TrainingConfig`` does not declare, checked against the real fields of the
    stage's TRL config (``TRL_CONFIGS``): each must be one, of this stage, and not one the run sets from
    another key (``SET_BY_THE_RUN``, this stage's ``STAGE_SETTINGS``). Imports trl only when there is such
    a key."""
    typed = {f.name for f in dataclasses.fields(TrainingConfig)}
    passed = sorted(set(vars(training)) - typed)
    if not passed or stage not in TRL_CONFIGS:
        return []
    import trl

    fields = {
        name: {f.name for f in dataclasses.fields(getattr(trl, config)) if f.init}
        for name, config in TRL_CONFIGS.items()
    }
    problems = []
    for key in passed:
        if key in SET_BY_THE_RUN or stage in STAGE_SETTINGS.get(key, ()):
            source = SET_BY_THE_RUN.get(key, f"stage.{key}")
            problems.append(f"training.{key}: set by the run from {source}; set that instead")
        elif key not in fields[stage]:
            stages = [name for name in STAGES if key in fields[name]]
            if stages:
                problems.append(
                    f"training.{key}: a setting of stage={' or '.join(stages)} "
                    f"({', '.join(TRL_CONFIGS[name] for name in stages)}), not of stage={stage} "
                    f"({TRL_CONFIGS[stage]}); remove it"
                )
                continue
            nearest = difflib.get_close_matches(key, sorted(fields[stage] | typed), n=3)
            fix = f"did you mean {', '.join(nearest)}?" if nearest else "remove it"
            problems.append(
                f"training.{key}: not a field of TRL's {TRL_CONFIGS[stage]} (stage={stage}); {fix}"
            )
    return problems


def lora_settings(method: MethodConfig) -> dict[str, Any]:
    """Every ``LoraConfig`` setting of ``method`` by name: the typed LoRA fields and the keys passed through
    (``method.use_dora=true``); the project's own (name, 4-bit loading, LoRA+) are not LoraConfig's."""
    typed = {f.name for f in dataclasses.fields(MethodConfig)}
    settings = {key: getattr(method, key) for key in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    return {**settings, **{key: value for key, value in vars(method).items() if key not in typed}}


def lora_pass_through_problems(method: MethodConfig) -> list[str]:
    """The ``method.*`` keys ``MethodConfig`` does not declare, checked against the real fields of peft's
    ``LoraConfig``: each must be one, and not one the run sets itself (``LORA_SET_BY_THE_RUN``). Imports peft
    only when there is such a key."""
    typed = {f.name for f in dataclasses.fields(MethodConfig)}
    passed = sorted(set(vars(method)) - typed)
    if not passed:
        return []
    if method.name == "full":
        return [
            f"method.{key}: a LoRA setting, and method=full trains no adapter; remove it" for key in passed
        ]
    import peft

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    problems = []
    for key in passed:
        if key in LORA_SET_BY_THE_RUN:
            problems.append(f"method.{key}: set by the run from {LORA_SET_BY_THE_RUN[key]}; remove it")
        elif key not in fields:
            nearest = difflib.get_close_matches(key, sorted(fields | typed), n=3)
            fix = f"did you mean {', '.join(nearest)}?" if nearest else "remove it"
            problems.append(f"method.{key}: not a field of peft's LoraConfig; {fix}")
    return problems


def init_name(value: Any) -> str:
    """``method.init_lora_weights`` as a lower-case name: Hydra reads ``true``/``false`` as booleans."""
    return str(value).lower()


def adapter_problems(config: Config) -> list[str]:
    """What peft cannot build from ``method.*``, and what a launch or stage cannot run with it, each with the
    reason: data-dependent initializations and DoRA's magnitudes read the base weights when peft wraps the
    model, which sharded launches do not all hold then (train/model/placement.py) and which sharded QLoRA
    fills only at step 0 (train/model/quantized_loading.py)."""
    method, strategy = config.method, config.launch.strategy
    if method.name not in ("lora", "qlora"):
        if method.loraplus_lr_ratio is not None:
            return ["method.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices, and "
                    f"method={method.name} has none; remove it"]  # fmt: skip
        return []
    settings = lora_settings(method)
    sharded = strategy in ("fsdp", "zero3", "zero3_offload")
    skeleton = method.name == "qlora" and sharded
    at_step_0 = (
        f"under {strategy} QLoRA's weights are read and quantized at step 0 "
        "(train/model/quantized_loading.py), after peft has wrapped the model's empty skeleton"
    )
    init = init_name(settings.get("init_lora_weights", True))
    problems = _lora_init_problems(config, init, settings, sharded)
    if problems:  # peft's own check of the rest, without the initialization already refused
        settings = {key: value for key, value in settings.items() if key != "init_lora_weights"}
    if set(settings) - {"r", "lora_alpha", "lora_dropout", "target_modules"}:
        problems += _peft_refuses(settings)
    if settings.get("use_dora") and skeleton:
        problems.append(
            f"method.use_dora: DoRA's magnitudes are the base weights' row norms, taken when peft wraps the "
            f"model, and {at_step_0}; use launch=ddp or zero2, or method=lora"
        )
    problems += _modules_to_save_problems(settings, skeleton, at_step_0, config.model.tie_word_embeddings)
    ratio = method.loraplus_lr_ratio
    if ratio is not None:
        if not isinstance(ratio, int | float) or ratio <= 0:
            problems.append(f"method.loraplus_lr_ratio: {ratio!r}; a number > 0 (the LoRA+ paper uses 16)")
        optim = str(config.training.optim)
        if any(family in optim for family in OWN_PARAMETER_GROUPS):
            problems.append(
                f"method.loraplus_lr_ratio: training.optim={optim} builds its own parameter groups, so it "
                "cannot take LoRA+'s; use an AdamW (adamw_torch), SGD or bitsandbytes optimizer"
            )
    return problems


def _peft_refuses(settings: dict[str, Any]) -> list[str]:
    """What peft's own ``LoraConfig`` refuses in these settings (its ``__post_init__``); keys that are no
    field of it, or set by the run, are ``lora_pass_through_problems``'."""
    import peft

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init} - set(LORA_SET_BY_THE_RUN)
    try:
        peft.LoraConfig(
            **{key: value for key, value in settings.items() if key in fields}, task_type="CAUSAL_LM"
        )
    except (ValueError, TypeError, ImportError) as error:
        return [f"method: peft's LoraConfig refuses these settings: {error}"]
    return []


def _lora_init_problems(config: Config, init: str, settings: dict[str, Any], sharded: bool) -> list[str]:
    """``method.init_lora_weights``: one peft knows, whose needs the run, its launch and stage can meet."""
    method, key = config.method, "method.init_lora_weights"
    pissa_niter = init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()
    if init in UNRUNNABLE_INITS:
        return [f"{key}={init}: {UNRUNNABLE_INITS[init]}; use true, gaussian, pissa or olora"]
    if init not in RANDOM_INITS + BASE_INITS and not pissa_niter:
        known = (*RANDOM_INITS, "pissa", "pissa_niter_<n>", "olora", "mica", *UNRUNNABLE_INITS)
        return [f"{key}: {settings['init_lora_weights']!r} is not one of peft's: {', '.join(known)}"]
    if init == "orthogonal" and method.r % 2:
        return [f"{key}=orthogonal: peft needs an even rank (it splits r in two); method.r is {method.r}"]
    if init in RANDOM_INITS:
        return []
    decomposes = "an SVD" if init.startswith("pissa") or init == "mica" else "a QR decomposition"
    problems = []
    if method.name == "qlora":
        why = (
            "peft re-quantizes the residual W - scale x B0A0, so the adapter is right only on that "
            "re-quantized base, which no checkpoint holds (peft warns of this gap when it converts, "
            "LoraModel.subtract_mutated_init)"
            if init == "olora"
            else f"peft runs {decomposes} of float weights and refuses 4-bit ones "
            f"(peft/tuners/lora/layer.py {init.split('_')[0]}_init: TypeError)"
        )
        problems.append(f"{key}={init}: {why}; use method=lora, or init_lora_weights=true or gaussian")
    elif sharded:
        problems.append(
            f"{key}={init}: peft computes it from the base weights when it wraps the model, and under "
            f"{config.launch.strategy} not every rank holds them then (FSDP: ranks but 0 hold empty tensors "
            "until accelerate broadcasts rank 0's, so they would decompose uninitialized memory; ZeRO-3: "
            "partitions, each gathered and changed in place), a path no test here proves; use launch=ddp or "
            "zero2, or init_lora_weights=true or gaussian"
        )
    changes_base = init != "mica"
    if changes_base and config.stage.name != "sft":
        problems.append(
            f"{key}={init}: stage={config.stage.name} scores its reference with the adapter disabled (TRL), "
            f"and {init} changes that base to the residual W - scale x B0A0, which is not the starting "
            "model; use init_lora_weights=true or gaussian"
        )
    if (
        changes_base
        and settings.get("use_rslora")
        and (settings.get("rank_pattern") or settings.get("alpha_pattern"))
    ):
        problems.append(
            f"{key}={init}: the adapter/ a run saves is converted to a plain LoRA of rank 2r, which peft "
            "cannot express with use_rslora and rank_pattern/alpha_pattern together (LoraModel"
            "._convert_state_dict_for_initial_model); drop use_rslora or the patterns"
        )
    return problems


def _modules_to_save_problems(
    settings: dict[str, Any], skeleton: bool, at_step_0: str, tied: bool
) -> list[str]:
    """``method.modules_to_save``: Llama modules the planner can count, apart from the LoRA targets; on a
    model whose LM head is its embedding (Llama 3.2 1B/3B), trained as the one tensor they are."""
    from train.plan.architecture import LINEARS

    modules = settings.get("modules_to_save")
    if not modules:
        return []
    key = "method.modules_to_save"
    savable = ("embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm", *LINEARS)
    if isinstance(modules, str) or not all(isinstance(name, str) for name in modules):
        return [f"{key}: {modules!r}; a list of module names, e.g. [lm_head]"]
    problems = [
        f"{key}: {name!r} is no module of Llama 3.1 that trains whole; use names from {', '.join(savable)}"
        for name in modules
        if name not in savable
    ]
    targets = settings.get("target_modules")
    targets = LINEARS if targets == "all-linear" else targets if isinstance(targets, list | tuple) else ()
    problems += [
        f"{key}: {name} is also a LoRA target (method.target_modules); train it one way"
        for name in modules
        if name in targets
    ]
    if skeleton:
        problems.append(
            f"{key}: peft copies these modules when it wraps the model, and {at_step_0}: the copies would "
            "stay empty; use launch=ddp or zero2, or method=lora"
        )
    embeddings = [name for name in modules if name in ("embed_tokens", "lm_head")]
    if tied and embeddings and not settings.get("ensure_weight_tying"):
        problems.append(
            f"{key}: {', '.join(embeddings)} is one tensor with the other embedding in this model "
            "(model.tie_word_embeddings), and peft copies only what it names: the trained copy would part "
            "from its twin, and a merged or saved model, tied by its config, keeps one of the two; add "
            "method.ensure_weight_tying=true (peft then trains one copy for both)"
        )
    return problems


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys in ``node`` that ``schema`` lacks, with their full names; ``training.*`` keys pass through to
    TRL, checked by ``pass_through_problems``, and ``method.*`` keys to peft, by
    ``lora_pass_through_problems``.

    Hydra lets ``+key=value`` append past struct mode, so the schema is checked once more here.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for key in node:
        if key not in fields:
            if schema not in (TrainingConfig, MethodConfig):
                unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(field_type := _resolved_type(schema, key)):
            unknown += unknown_keys(node[key], field_type, f"{prefix}{key}.")
    return unknown


def _resolved_type(schema: type, key: str) -> type:
    return typing.get_type_hints(schema)[key]


def load_config(cfg: DictConfig, *, check: bool = True) -> Config:
    """Turn Hydra's composed config into the typed ``Config``, or raise ConfigError with every problem.

    ``check=False`` skips ``validate`` (paths, cross-field rules), for tools that only read the
    config, such as the memory planner; unknown keys, wrong types and ``training.*`` keys that are no field
    of the stage's TRL config still fail.
    """
    unknown = unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(
            "unknown config keys (a typo, or `+key=` adding what the schema in train/config.py lacks): "
            + ", ".join(unknown)
        )
    try:
        config: Config = OmegaConf.to_object(cfg)
    except Exception as error:  # a MISSING value surfaces only here
        raise ConfigError(str(error)) from None
    problems = pass_through_problems(config.training, config.stage.name)
    problems += lora_pass_through_problems(config.method)
    problems += validate(config) if check else []
    if problems:
        raise ConfigError("the config cannot run:\n  " + "\n  ".join(problems))
    if config.launch.cp_size > 1 and config.model.attn_implementation == "auto":
        config.model.attn_implementation = "sdpa"  # torch's context parallelism shards SDPA only
    return config
