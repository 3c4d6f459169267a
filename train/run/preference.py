"""DPO and KTO: TRL's DPOTrainer / KTOTrainer on our prepared preference rows, with the run's callbacks.

``data.rows`` encodes the rows these trainers collate (``prompt_ids`` + ``chosen_ids`` /
``rejected_ids``, or ``completion_ids`` + ``label``), token-exact with our Llama 3.1 encoder and already
cut to ``max_length``. TRL 1.16 has no pre-tokenized path: both trainers' ``__init__`` always call
``_prepare_dataset``, which renders and tokenizes ``prompt``/``chosen``/... text again
(trl/trainer/dpo_trainer.py, kto_trainer.py). Here it returns our rows as they are; KTO shuffles them
with the seed and adds ``KL_completion_ids``, each a completion of another prompt (``kl_partners``).

The reference model is the starting model, frozen. LoRA/QLoRA: none in memory; TRL scores the reference
with the adapter disabled (a new adapter), or with a frozen copy of the adapter a run starts from
(``stage.init_from``: TRL's "ref" adapter). Full fine-tuning: a second copy of the weights, made here,
since TRL would reload it from ``model.config._name_or_path``, which a model built from the architecture
does not have.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.trainer import dpo_trainer, kto_trainer
from trl.trainer.utils import FusedCausalLMOutput, global_then_local_main_first

from train.config import Config
from train.export import base_of, merged_model
from train.model.build import (
    build_model,
    build_peft_config,
    compute_dtype_of,
    finished,
    load_checkpoint,
    new_reward_model,
    weights_dtype,
)
from train.model.placement import Placement
from train.run.outputs import final_dir
from train.run.run_dir import run_config
from train.run.trainer import ShardedOnCpu, keep_adapters_fp32, stage_trainer


class LlamaDPOTrainer(ShardedOnCpu, DPOTrainer):
    """TRL's DPOTrainer on rows with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``."""

    def __init__(self, *args, cpu_fused_lm_head: bool = False, **kwargs):
        with reference_from_rank_zero(dpo_trainer):
            super().__init__(*args, **kwargs)
        _after_init(self, cpu_fused_lm_head)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class LlamaKTOTrainer(ShardedOnCpu, KTOTrainer):
    """TRL's KTOTrainer on rows with ``prompt_ids``, ``completion_ids``, ``label``."""

    def __init__(self, *args, cpu_fused_lm_head: bool = False, **kwargs):
        with reference_from_rank_zero(kto_trainer):
            super().__init__(*args, **kwargs)
        _after_init(self, cpu_fused_lm_head)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """The rows shuffled with the seed, each with ``KL_completion_ids``: a completion of another prompt
        (``kl_partners``). TRL rotates completions by one within each batch of per_device_train_batch_size
        rows, (x1, y_n), (x2, y1), ... (kto_trainer.py, _prepare_dataset), and never shuffles, since KTOConfig
        samples in order (train_sampling_strategy="sequential") so that batches stay as built; our rows come
        with a prompt's completions side by side, so that rotation mostly pairs a prompt with its own."""
        if not self.calculate_KL:
            return dataset
        seed = args.seed if args.data_seed is None else args.data_seed  # the sampler's seed in transformers
        order, partners = kl_partners(dataset["prompt_ids"], args.per_device_train_batch_size, seed)
        with global_then_local_main_first():  # the first process writes the shuffled rows' cache
            shuffled = dataset.select(order)
            completions = shuffled["completion_ids"]
            return shuffled.add_column("KL_completion_ids", [completions[p] for p in partners])


@contextlib.contextmanager
def reference_from_rank_zero(trainer_module):
    """While a DPO/KTO trainer is built: shard its reference model under FSDP2 the way accelerate shards the
    policy, broadcasting rank 0's weights when only rank 0 read them (``fsdp_cpu_ram_efficient_loading``).

    TRL's ``prepare_fsdp`` (trl/models/utils.py) calls ``fully_shard`` without that broadcast, so a reference
    that ranks other than 0 hold only as shapes (``reference_copy``) would keep their uninitialised values.
    accelerate's ``fsdp2_prepare_model`` is the policy's own path; everything else stays TRL's.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    trl_prepare = trainer_module.prepare_fsdp

    def prepare(model, accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading:
            return fsdp2_prepare_model(accelerator, model)
        return trl_prepare(model, accelerator)

    trainer_module.prepare_fsdp = prepare
    try:
        yield
    finally:
        trainer_module.prepare_fsdp = trl_prepare


def kl_partners(prompts: list[list[int]], batch_size: int, seed: int) -> tuple[list[int], list[int]]:
    """KTO's mismatched pairs: ``order``, the rows shuffled with ``seed``, and ``partners``, for each position
    in that order the position whose completion goes with its prompt in the KL term, always one of another
    prompt. Within a batch of ``batch_size`` positions, the batch's own completions, moved past the largest
    group of rows sharing a prompt (the set TRL's estimate wants: the batch's completions, other prompts);
    where one prompt holds over half a batch, its remaining rows draw one from anywhere else, with ``seed``.
    """
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    keys = [tuple(prompts[row]) for row in order]
    if len(set(keys)) < 2:
        raise ValueError(
            "KTO's KL term pairs each prompt with a completion of another prompt, but every row has the same "
            "prompt; add rows of other prompts, or use stage.loss_type=apo_zero_unpaired (no KL term)"
        )
    partners = []
    for start in range(0, len(keys), batch_size):
        batch = range(start, min(start + batch_size, len(keys)))
        groups: dict[tuple, list[int]] = {}
        for position in batch:
            groups.setdefault(keys[position], []).append(position)
        grouped = [position for group in groups.values() for position in group]
        # grouped positions shifted by the largest group's size: no group meets itself unless it is over half
        shift = max(len(group) for group in groups.values())
        moved = dict(zip(grouped, grouped[shift:] + grouped[:shift], strict=True))
        partners += [moved[position] for position in batch]
    for position, partner in enumerate(partners):
        while keys[partner] == keys[position]:
            partner = rng.randrange(len(keys))
        partners[position] = partner
    return order, partners


def _after_init(trainer: DPOTrainer | KTOTrainer, cpu_fused_lm_head: bool) -> None:
    """What TRL's __init__ decided that a run undoes: the bf16 QLoRA adapter (``keep_adapters_fp32``), and
    on CPU the chunked LM-head kernel (``score_with_model_logits``)."""
    keep_adapters_fp32(trainer.model)
    if isinstance(trainer.model, PeftModel) and "ref" in trainer.model.peft_config:
        # A starting adapter (init_model): TRL copied it to "ref" before casting a quantized model's adapter
        # to bf16, so the frozen copy holds its exact values; the trained one starts from them again (step 0:
        # policy == reference, to the bit).
        for name, parameter in trainer.model.named_parameters():
            if ".default." in name:
                parameter.data.copy_(trainer.model.get_parameter(name.replace(".default.", ".ref.")).data)
    if trainer.args.use_cpu and not cpu_fused_lm_head:
        policy = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
        for model in (policy, trainer.ref_model):
            if model is not None:
                score_with_model_logits(trainer.accelerator.unwrap_model(model))


def score_with_model_logits(model: PreTrainedModel) -> None:
    """Score ``model(..., labels=..., fused_lm_head=True)`` with one plain LM-head matmul, for CPU.

    TRL's DPO/KTO trainers patch the model (``trl.trainer.utils.add_fused_lm_head``) to score the LM head
    in [tokens x 32,768] tiles that never hold the full logits: a Triton kernel on GPU that scores only the
    labelled positions, but on CPU a plain-torch loop over every position (prompt and padding included)
    that recomputes each tile in backward. Here, as TRL's GPU path does, only the labelled (completion)
    positions reach the LM head, in one matmul, and their log-probs come from one cross-entropy; the
    metrics' fields (entropy, mean logit, top-1 hit) from the same logits without gradient. The result is
    TRL's ``FusedCausalLMOutput``, zero where the label is -100, as the trainers expect.
    """
    forward = type(model).forward

    @functools.wraps(forward)
    def scored_forward(self, *args, fused_lm_head: bool = False, labels=None, **kwargs):
        if not fused_lm_head:
            return forward(self, *args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        log_probs = -F.cross_entropy(logits, targets, reduction="none")
        with torch.no_grad():
            entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
            mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == targets

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=per_token(log_probs),
            entropy=per_token(entropy), mean_logits=per_token(mean_logits), is_top1=per_token(is_top1),
            label_mask=mask,
        )  # fmt: skip

    model.forward = scored_forward.__get__(model)


# ── the model a run starts from ───────────────────────────────────────────────────────────────
def init_model(config: Config, tokenizer, dtype: torch.dtype, placement: Placement | None = None):
    """The model a dpo/kto run with ``stage.init_from`` starts from (validated by ``train.config``).

    - the run was full fine-tuning: its ``model/`` weights are this run's base; this run's method applies
      (full, or a new LoRA/QLoRA adapter on them);
    - it trained a LoRA/QLoRA adapter and this run does too: the same base, and the adapter goes on
      training (TRL's DPO docs: "continue training your PeftModel"; the reference is TRL's frozen "ref"
      copy of it, so the reference is exactly the SFT policy at an adapter's cost);
    - it trained an adapter and this run is full fine-tuning: the adapter merged into its base
      (``train.export.merged_model``; a QLoRA base is dequantized), stored as ``build_model`` stores full
      weights (``train.model.build.weights_dtype``): fp32 under one process or DDP, where the weights are
      their own master copy, ``dtype`` under FSDP/DeepSpeed, whose engines keep the fp32 master.
    """
    start = Path(config.stage.init_from)
    previous = run_config(start)
    if previous.method.name != "full" and config.method.name == "full":
        merged, _ = merged_model(start)
        return merged.to(weights_dtype(config.method, dtype, placement)).requires_grad_(True)
    base, seed = base_of(config)
    model = build_model(base, tokenizer, dtype=dtype, seed=seed, method=config.method, placement=placement)
    if previous.method.name == "full":
        return model
    return PeftModel.from_pretrained(model, final_dir(start, previous.method.name), is_trainable=True)


def fresh_start(
    config: Config, tokenizer, dtype: torch.dtype, placement: Placement | None = None, reward: bool = False
):
    """The model a run that does not continue an adapter starts from (stage=rm, stage=grpo): the base
    (``model.*``), or the run ``stage.init_from`` names: a full run's ``model/`` as it is; an adapter run's
    adapter merged into its base (``train.export.merged_model``). This run's method applies to the result
    (full, or a new LoRA adapter, whose disabled state is then the starting policy; QLoRA from an adapter
    run is refused by ``train.config``). ``reward``: under a new ``score`` head drawn from the seed
    (``train.model.build.build_model``)."""
    seed = config.training.seed
    previous = run_config(Path(config.stage.init_from)) if config.stage.init_from else None
    if previous is None or previous.method.name == "full":
        base, _ = base_of(config)  # model.*, or the full run's model/
        return build_model(
            base, tokenizer, dtype=dtype, seed=seed, method=config.method, placement=placement, reward=reward
        )
    merged, _ = merged_model(Path(config.stage.init_from))
    if reward:  # the merged decoder under a new head
        head = new_reward_model(merged.config, seed)
        head.model.load_state_dict(merged.model.state_dict())
        merged = head
    full = config.method.name == "full"
    merged = merged.to(weights_dtype(config.method, dtype, placement)).requires_grad_(full)
    return finished(merged, tokenizer)


# ── the trainer ──────────────────────────────────────────────────────────────────────────────
_TRAINERS = {"dpo": LlamaDPOTrainer, "kto": LlamaKTOTrainer}


def reference_copy(model: PreTrainedModel, args: DPOConfig | KTOConfig, placement: Placement | None):
    """Full fine-tuning's reference: the starting weights, frozen, in the compute dtype (a frozen copy needs
    no fp32 master). Under FSDP's rank-0 loading, rank 0's weights are broadcast to every other rank: those
    build the reference as shapes on the meta device and get rank 0's values when it is sharded
    (``reference_from_rank_zero``), so no rank but 0 ever holds a whole second copy. Under ZeRO-3 it is
    partitioned while read, as the policy was."""
    compute = compute_dtype_of(args)
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        # ZeRO-3's zero.Init partitioned the policy as it was read (a deepcopy would copy DeepSpeed's
        # bookkeeping, not weights): the reference is read the same way, from the same checkpoint
        return (
            load_checkpoint(model.name_or_path, compute, model.config._attn_implementation)
            .requires_grad_(False)
            .eval()
        )
    if placement is not None and placement.loads_on_rank_zero and not placement.is_main:
        with torch.device("meta"):
            reference = type(model)(model.config)
        # buffers are not broadcast (rotary inv_freq is not in the state dict): the policy's, which are real
        buffers = dict(model.named_buffers())
        for name, _ in list(reference.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            module = reference.get_submodule(owner)
            persistent = leaf not in module._non_persistent_buffers_set
            module.register_buffer(leaf, buffers[name].clone(), persistent=persistent)
    else:
        reference = copy.deepcopy(model)
    return reference.requires_grad_(False).eval().to(compute)


def build_preference_trainer(
    config: Config,
    model,
    tokenizer,
    dataset: Dataset,
    run_dir: Path,
    args: DPOConfig | KTOConfig,
    placement: Placement | None = None,
    eval_dataset: Dataset | None = None,
):
    """TRL's trainer for ``stage.name`` (dpo or kto) on prepared preference rows, with ``args`` from
    ``train.run.trainer.training_args`` (``stage.*`` as DPOConfig/KTOConfig settings) and the callbacks every
    run has (metrics, launch check, checkpoints)."""
    adapter = isinstance(model, PeftModel)  # an adapter a run started from: it trains on (init_model)
    reference = reference_copy(model, args, placement) if config.method.name == "full" else None
    return stage_trainer(  # evaluation logs TRL's rewards and margins with the eval loss
        _TRAINERS[config.stage.name], config, run_dir, args, eval_dataset, model=model, ref_model=reference,
        train_dataset=dataset, processing_class=tokenizer,
        peft_config=None if adapter else build_peft_config(config.method),
        cpu_fused_lm_head=config.training.cpu_fused_lm_head,
    )  # fmt: skip
