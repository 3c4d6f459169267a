"""The trainer a run builds: labels from assistant masks, CPU precision, what trains."""

from __future__ import annotations

import torch
from conftest import NO_EVAL
from test_config import composed

from data import encode_conversations, load_conversations
from train.config import load_config
from train.model.build import build_model, compute_dtype
from train.run.outputs import save_resolved_config
from train.run.trainer import build_trainer, training_args


def tiny_trainer(tmp_path, tokenizer, *overrides: str):
    cfg = composed("training.report_to=[]", "training.max_length=256", NO_EVAL, *overrides)
    cfg.output_dir = str(tmp_path)
    config = load_config(cfg)
    save_resolved_config(cfg, tmp_path)  # as a run leaves it, for tools that read run directories
    conversations = load_conversations(config.data.path, config.data.format).conversations[:8]
    dataset, _ = encode_conversations(conversations, tokenizer, max_length=config.training.max_length)
    dtype = compute_dtype(config.model.dtype)
    model = build_model(config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method)
    return build_trainer(
        config, model, tokenizer, dataset, tmp_path, training_args(config, tmp_path, dtype)
    ), dataset


def test_sft_trainer_turns_assistant_masks_into_labels(tmp_path, tokenizer):
    trainer, dataset = tiny_trainer(tmp_path, tokenizer)
    prepared = trainer.train_dataset
    assert len(prepared) == len(dataset)
    for row, original in zip(prepared, dataset, strict=True):
        assert row["input_ids"] == original["input_ids"]
        expected = [
            t if m else -100 for t, m in zip(original["input_ids"], original["assistant_masks"], strict=True)
        ]
        assert row["labels"] == expected


def test_cpu_run_computes_in_fp32(tmp_path, tokenizer):
    trainer, _ = tiny_trainer(tmp_path, tokenizer)
    if torch.cuda.is_available():
        assert trainer.args.bf16
    else:
        assert not trainer.args.bf16 and not trainer.args.fp16 and trainer.args.use_cpu
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_lora_trains_only_the_adapter_on_attention(tmp_path, tokenizer):
    trainer, _ = tiny_trainer(tmp_path, tokenizer)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_full_trains_every_parameter(tmp_path, tokenizer):
    trainer, _ = tiny_trainer(tmp_path, tokenizer, "method=full")
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_lora_on_all_linear_layers(tmp_path, tokenizer):
    trainer, _ = tiny_trainer(tmp_path, tokenizer, "method.target_modules=all-linear")
    adapted = {name.split(".")[-4] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_trl_fields_pass_through_to_the_trainer_arguments(tmp_path):
    config = load_config(composed(
        "training.ddp_timeout=600", "+training.save_only_model=true", "training.torch_compile=true",
        "training.gradient_checkpointing_kwargs={use_reentrant:false}", "training.neftune_noise_alpha=5",
        "training.loss_type=dft",  # SFTConfig's own; stage.loss_type is DPO's and KTO's
    ))  # fmt: skip
    args = training_args(config, tmp_path, torch.float32)
    assert (args.ddp_timeout, args.save_only_model, args.torch_compile, args.neftune_noise_alpha) == (
        600, True, True, 5
    )  # fmt: skip
    assert args.loss_type == "dft"
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    dpo = composed("stage=dpo", "data=preference_sample", "training.precompute_ref_log_probs=true")
    assert training_args(load_config(dpo), tmp_path, torch.float32).precompute_ref_log_probs is True


def test_ddp_looks_for_unused_parameters_only_where_some_may_be_unused(tmp_path, tokenizer):
    """transformers asks DDP for find_unused_parameters=True for a PeftModel (trainer.py,
    _build_accelerator_args): an extra autograd-graph traversal every step. Full weights and adapters on the
    decoder's Linears all get gradients each step, so the run turns it off, down to the kwargs accelerate
    wraps DDP with; an adapter on lm_head (TRL's fused LM head skips it) keeps transformers' choice, and a
    user's own value wins."""
    trainer, _ = tiny_trainer(tmp_path, tokenizer)  # LoRA on q/k/v/o
    assert trainer.args.ddp_find_unused_parameters is False
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False

    def find_unused(*overrides: str):
        args = training_args(load_config(composed(*overrides)), tmp_path, torch.float32)
        return args.ddp_find_unused_parameters

    for off in (["method=full"], ["method=qlora"], ["method.target_modules=all-linear"],
                ["stage=dpo", "data=preference_sample"], ["model.gradient_checkpointing=true"]):  # fmt: skip
        assert find_unused(*off) is False, off
    assert find_unused("method.target_modules=[q_proj,lm_head]") is None
    assert find_unused("+training.ddp_find_unused_parameters=true") is True
