"""The structured config schema: Hydra composes ``conf/`` into these dataclasses.

Types and unknown keys are checked by Hydra/OmegaConf at composition; ``validate``
checks what spans fields and reports every problem at once, each with its key and fix.
Numbers live in ``conf/``; fields without a sensible universal value are ``MISSING``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")
DTYPES = ("auto", "bfloat16", "float16", "float32")


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


@dataclass
class MethodConfig:
    """full, lora or qlora; LoRA fields use peft's ``LoraConfig`` names."""

    name: str = MISSING
    r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: Any = None  # a list of module names, or "all-linear"
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # bitsandbytes' BitsAndBytesConfig names
    bnb_4bit_use_double_quant: bool = True


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING
    format: str = MISSING
    strict: bool = False  # true: the first bad record stops the run; false: skip and count it
    lang: list[str] | None = None  # OpenAssistant trees: keep only these language codes
    threads: str = "best"  # OpenAssistant trees: best (best-ranked reply at each step) or all (every path)
    overflow: str = "truncate"  # conversations over training.max_length: truncate or drop
    num_proc: int = MISSING  # processes encoding the source (datasets' map)
    cache_dir: str | None = None  # prepared datasets; None: $XDG_CACHE_HOME/llama31-finetune/datasets


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
    signal_seconds: int = MISSING  # USR1 this long before the time limit: checkpoint, then requeue
    job_name: str = MISSING
    sbatch_extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--exclusive"
    setup: list[str] = field(default_factory=list)  # shell lines run first: module load, env vars
    python: str | None = None  # the interpreter on the nodes; None: the one that ran `python -m launch`


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


@dataclass
class TrainingConfig:
    """Settings passed to TRL's ``SFTConfig`` under the same names."""

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
    packing: bool = False
    packing_strategy: str = MISSING  # bfd: best-fit decreasing; packed sequences never attend to each other
    logging_steps: int = MISSING
    save_steps: int = MISSING
    save_total_limit: int | None = None
    report_to: list[str] = field(default_factory=list)
    dataloader_num_workers: int = 0
    include_num_input_tokens_seen: str = "non_padding"  # counts tokens, for tokens/s in metrics and sweeps
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in this run's directory
    cpu_fused_lm_head: bool = False  # CPU only: TRL's chunked LM-head kernel instead of the model's own loss


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline needs no account and no network; `wandb sync` uploads later
    project: str = MISSING
    entity: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = MISSING


class ConfigError(ValueError):
    """A config that cannot work; lists every problem with its key and the fix."""


def sample_path(name: str) -> str:
    """``${sample:file}`` in configs: a data file shipped in ``data/samples/`` (``data`` not imported)."""
    package = importlib.util.find_spec("data")
    return str(Path(package.origin).parent / "samples" / name)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config tree composed with ``overrides``, for command-line tools that are not Hydra apps
    (``python -m data.prepare``, ``python -m train.plan``): no run directory, no Hydra logging."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    ):
        return compose(config_name="config", overrides=[*overrides, "output_dir=unused"])


def register_configs() -> None:
    """Make the schema the base of ``conf/config.yaml`` (its defaults list names ``schema``)."""
    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("sample", sample_path, replace=True)


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
    if not Path(config.data.path).is_file():
        problems.append(
            f"data.path: {config.data.path} is not a file; point it at a local {config.data.format} file"
        )
    if config.data.threads not in ("best", "all"):
        problems.append(f"data.threads: {config.data.threads!r}; use best (one per tree) or all (every path)")
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
    if launch.slurm.signal_seconds < 1:
        problems.append(
            "launch.slurm.signal_seconds: must be > 0, or the job is never warned before its limit"
        )
    return problems


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys in ``node`` that ``schema`` lacks, with their full names.

    Hydra lets ``+key=value`` append past struct mode, so the schema is checked once more here.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for key in node:
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(field_type := _resolved_type(schema, key)):
            unknown += unknown_keys(node[key], field_type, f"{prefix}{key}.")
    return unknown


def _resolved_type(schema: type, key: str) -> type:
    return typing.get_type_hints(schema)[key]


def load_config(cfg: DictConfig, *, check: bool = True) -> Config:
    """Turn Hydra's composed config into the typed ``Config``, or raise ConfigError with every problem.

    ``check=False`` skips ``validate`` (paths, cross-field rules), for tools that only read the
    config, such as the memory planner; unknown keys and wrong types still fail.
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
    problems = validate(config) if check else []
    if problems:
        raise ConfigError("the config cannot run:\n  " + "\n  ".join(problems))
    return config
