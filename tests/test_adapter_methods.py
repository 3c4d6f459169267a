"""Adapter methods: peft's LoraConfig fields under ``method.*`` (DoRA, rsLoRA, PiSSA/OLoRA, all-linear,
modules_to_save) and LoRA+ (``method.loraplus_lr_ratio``). Each trains the tiny model, its loss on the rows it
trained on falls, and the adapter/ it saves loads in plain peft on the rebuilt base with the run's logits."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import weakref

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_config import composed
from test_trainer import tiny_trainer

from train.config import load_config
from train.model.build import build_model

# A few steps on short rows; no dropout, so that a forward is deterministic in train mode, where logits are
# compared: on a CPU bitsandbytes repacks 4-bit weights at an eval-mode forward without gradients (see
# train.run.trainer.keep_4bit_weights_unpacked_for_dora), and the reloaded model must not differ by that.
FEW_STEPS = (
    "training.max_steps=3",
    "training.save_steps=100",
    "training.max_length=96",
    "method.lora_dropout=0.0",
)
VARIANTS = {
    "dora": ("method.use_dora=true",),
    "rslora": ("method.use_rslora=true",),
    # the randomized SVD (4 iterations): only the adapter converted to a plain LoRA reloads the same model
    "pissa": ("method.init_lora_weights=pissa_niter_4",),
    "olora_dora": ("method.init_lora_weights=olora", "method.use_dora=true"),
    "loraplus": ("method.loraplus_lr_ratio=16",),
    "all_linear_lm_head": ("method.target_modules=all-linear", "method.modules_to_save=[lm_head]"),
    "qdora": ("method=qlora", "method.use_dora=true"),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loss_and_logits(model, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The causal-LM loss of ``input_ids`` and their logits, in train mode without gradients (FEW_STEPS)."""
    model.train()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
    return out.loss.item(), out.logits


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """Each variant trained once per module: ``(trainer, directory, rows, loss before, loss after)``."""
    runs = {}

    def trained(variant: str):
        if variant not in runs:
            directory = tmp_path_factory.mktemp(variant)
            trainer, dataset = tiny_trainer(directory, tokenizer, *FEW_STEPS, *VARIANTS[variant])
            shortest = min(len(dataset[i]["input_ids"]) for i in range(2))
            rows = torch.tensor([dataset[i]["input_ids"][:shortest] for i in range(2)])
            before, _ = loss_and_logits(trainer.model, rows)
            trainer.train()
            after, _ = loss_and_logits(trainer.model, rows)
            trainer.save_model(str(directory / "adapter"))  # the final save a run makes (ShardedOnCpu)
            runs[variant] = trainer, directory, rows, before, after
        return runs[variant]

    return trained


def reloaded(directory, tokenizer, variant: str) -> PeftModel:
    """The run's adapter/ on its base rebuilt from the config, with peft alone."""
    config = load_config(composed(*VARIANTS[variant]))
    base = build_model(
        config.model, tokenizer, dtype=torch.float32, seed=config.training.seed, method=config.method
    )
    return PeftModel.from_pretrained(base, directory / "adapter")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_its_adapter_reloads_with_the_runs_logits(run, tokenizer, variant):
    trainer, directory, rows, before, after = run(variant)
    assert after < before - 0.05, (before, after)
    loss, logits = loss_and_logits(trainer.model, rows)
    reloaded_loss, reloaded_logits = loss_and_logits(reloaded(directory, tokenizer, variant), rows)
    # PiSSA/OLoRA's adapter is rewritten as W + s(BA - B0A0) for the base the run changed to W - s B0A0:
    # equal up to float rounding; every other variant to the bit
    tolerance = 1e-4 if variant in ("pissa", "olora_dora") else 0.0
    torch.testing.assert_close(reloaded_logits, logits, atol=tolerance, rtol=0)
    assert reloaded_loss == pytest.approx(loss, abs=1e-5)


def test_dora_trains_a_magnitude_per_output_feature_and_saves_it(run):
    trainer, directory, _, _, _ = run("dora")
    magnitudes = {n: p for n, p in trainer.model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 8 and all(p.requires_grad for p in magnitudes.values())  # 2 layers x q/k/v/o
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.lora_magnitude_vector["default"].weight.shape == (q_proj.out_features,)
    saved = load_file(directory / "adapter" / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in name for name in saved) == 8
    assert json.loads((directory / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(run):
    trainer, directory, _, _, _ = run("rslora")
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 32 / math.sqrt(16)  # conf/method/lora.yaml: alpha 32, r 16 (LoRA: 2)
    assert json.loads((directory / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True


@pytest.mark.parametrize("variant", ["pissa", "olora_dora"])
def test_pissa_and_olora_save_a_plain_lora_of_twice_the_rank_for_the_unchanged_base(run, tokenizer, variant):
    """The run trains on the residual W - s B0A0 (peft changes the base when it wraps the model); adapter/ is
    peft's conversion to a plain LoRA on W: rank 2r, alpha 2 alpha (same scale), init_lora_weights true, so
    that peft, merges and servers apply it to the base as it is. DoRA's magnitudes go along unchanged."""
    trainer, directory, _, _, _ = run(variant)
    config = json.loads((directory / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (32, 64, True)
    saved = load_file(directory / "adapter" / "adapter_model.safetensors")
    q_a = next(t for name, t in saved.items() if "layers.0.self_attn.q_proj.lora_A" in name)
    assert q_a.shape == (32, 128)
    base = build_model(load_config(composed()).model, tokenizer, dtype=torch.float32, seed=42)
    residual = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, base.model.layers[0].self_attn.q_proj.weight)  # W - s B0A0
    reloaded_q = reloaded(directory, tokenizer, variant).get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(reloaded_q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)  # W itself
    assert sum("lora_magnitude_vector" in name for name in saved) == (8 if variant == "olora_dora" else 0)


def test_loraplus_gives_the_b_matrices_the_learning_rate_times_the_ratio(tmp_path, tokenizer):
    """peft's create_loraplus_optimizer with the run's optimizer: A at learning_rate, B (and DoRA's magnitude
    vectors, peft groups 1-D parameters with B) at learning_rate x method.loraplus_lr_ratio, both with
    training.weight_decay and the run's AdamW betas and epsilon."""
    trainer, _ = tiny_trainer(
        tmp_path, tokenizer, "method.loraplus_lr_ratio=16", "method.use_dora=true",
        "training.learning_rate=2e-4", "training.weight_decay=0.01", "+training.adam_beta2=0.95",
    )  # fmt: skip
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
        for parameter in group["params"]:
            kind = next(k for k in ("lora_A", "lora_B", "lora_magnitude_vector") if k in names[id(parameter)])
            lrs.setdefault(kind, set()).add((group["lr"], group["weight_decay"]))
    assert lrs == {
        "lora_A": {(2e-4, 0.01)},
        "lora_B": {(2e-4 * 16, 0.01)},
        "lora_magnitude_vector": {(2e-4 * 16, 0.01)},
    }
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3 * 8  # every trainable tensor, once


def test_loraplus_run_steps_with_the_ratio(run):
    trainer, _, _, _, _ = run("loraplus")
    rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups if group["params"]})
    assert rates == [5e-3, 5e-3 * 16]  # conf/config.yaml's learning rate, and x 16 for B


def test_all_linear_adapts_every_decoder_linear_and_trains_the_lm_head_whole(run):
    trainer, directory, _, _, _ = run("all_linear_lm_head")
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    adapted = {name.split(".")[-4] for name in trainable if "lora_" in name}
    assert adapted == set(LINEARS)  # peft's all-linear leaves the output layer out
    assert [name for name in trainable if "lora_" not in name] == [
        "base_model.model.lm_head.modules_to_save.default.weight"
    ]
    saved = load_file(directory / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.lm_head.weight"].shape == (128_256, 128)
    assert saved["base_model.model.lm_head.weight"].dtype == torch.float32  # a trainable copy: fp32


def test_qdora_adapts_4bit_layers_and_an_evaluation_does_not_corrupt_its_norm(run):
    """bitsandbytes repacks a Linear4bit's codes for its CPU kernel at an eval-mode forward, and peft's DoRA
    would then dequantize the repacked bytes for its norm (the whole model's logits 4.4 off, measured): the
    run keeps DoRA's 4-bit layers unpacked, so an evaluation leaves each adapted layer computing as it did.
    (The layers without an adapter take bitsandbytes' CPU kernel in eval mode, as plain QLoRA's do.)"""
    import bitsandbytes as bnb

    trainer, _, _, _, _ = run("qdora")
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and "default" in q_proj.lora_magnitude_vector
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        training = q_proj.train()(x)
        evaluated = q_proj.eval()(x)
        again = q_proj.train()(x)
    assert not getattr(q_proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(evaluated, training, atol=0, rtol=0)
    torch.testing.assert_close(again, training, atol=0, rtol=0)


def test_the_planner_counts_what_peft_trains(run):
    """The planner's trainable count (train/plan/memory.py adapter_parameters) is peft's, for DoRA and for
    all-linear with the LM head trained whole."""
    from train.plan.memory import adapter_parameters

    for variant in ("dora", "all_linear_lm_head"):
        trainer = run(variant)[0]
        config = load_config(composed(*VARIANTS[variant]))
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        assert adapter_parameters(config.model, config.method) == trained


@pytest.mark.slow
def test_dora_keeps_two_outputs_per_token_and_with_dropout_the_dequantized_weight(tokenizer):
    """What DoRA's forward keeps for the backward beyond LoRA's, measured with autograd's saved-tensor hooks
    on one adapted q_proj of the tiny model (fp32 on CPU), against the planner's activations
    (train/plan/memory.py): 2 x 4 bytes x out per token (the base output and B(A(x))); with dropout, QLoRA's
    dequantized weight (4 x in x out, once), LoRA's none (in fp32 the matmul keeps the parameter itself)."""
    from peft import get_peft_model

    from train.model.build import build_peft_config
    from train.plan.memory import activation_bytes

    def config_of(method: str, use_dora: bool, dropout: float):
        overrides = (f"method={method}", f"method.use_dora={str(use_dora).lower()}",
                     f"method.lora_dropout={dropout}", "method.target_modules=[q_proj]")  # fmt: skip
        return load_config(composed(*overrides))

    def saved_bytes(config):
        """What one adapted q_proj's graph holds after a forward of so many tokens, parameters aside."""
        base = build_model(config.model, tokenizer, dtype=torch.float32, seed=0, method=config.method)
        q_proj = get_peft_model(base, build_peft_config(config.method)).base_model.model.model.layers[0]
        q_proj = q_proj.self_attn.q_proj.train()  # dropout on: DoRA recomputes the base output
        parameters = {p.untyped_storage().data_ptr() for p in q_proj.parameters()}

        def count(tokens: int) -> int:
            saved = []  # what the graph holds; DoRA's norm saves more, freed when its forward returns

            def pack(tensor):
                if tensor.untyped_storage().data_ptr() not in parameters:
                    saved.append((weakref.ref(tensor), tensor.untyped_storage()))
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = q_proj(torch.randn(1, tokens, 128, requires_grad=True))
            gc.collect()
            alive = {
                storage.data_ptr(): storage.nbytes() for tensor, storage in saved if tensor() is not None
            }
            del output
            return sum(alive.values())

        return count

    def per_token_and_once(count) -> tuple[int, int]:
        """The slope over tokens and what is left at 0 tokens, from 8 and 16 tokens."""
        per_token = (count(16) - count(8)) // 8
        return per_token, count(8) - 8 * per_token

    out = 128
    for method, dropout in (("lora", 0.0), ("lora", 0.1), ("qlora", 0.1)):
        plain, dora = config_of(method, False, dropout), config_of(method, True, dropout)
        measured = [per_token_and_once(saved_bytes(c)) for c in (plain, dora)]

        def planned(config, tokens):
            fp32 = dataclasses.replace(config.model, dtype="float32")  # auto on a CPU
            return activation_bytes(fp32, config.method, tokens, checkpointing=True)  # one layer's share

        counted = [per_token_and_once(lambda t, c=c: planned(c, t)) for c in (plain, dora)]
        assert measured[1][0] - measured[0][0] == counted[1][0] - counted[0][0] == 2 * 4 * out, method
        weight = counted[1][1] - counted[0][1]
        assert weight == (4 * 128 * out if method == "qlora" and dropout else 0), (method, dropout)
        # besides: a few vectors of out values a layer (the magnitude's scale, the detached norm)
        assert weight <= measured[1][1] - measured[0][1] <= weight + 4 * 4 * out, (method, dropout, measured)


# ── under FSDP and ZeRO-3: the same run as DDP, from a checkpoint read the way each launch reads it ──────
SHARDED = (
    "method.use_dora=true", "method.loraplus_lr_ratio=16", "method.use_rslora=true",
    "method.target_modules=all-linear", "method.modules_to_save=[lm_head]",
    "model.gradient_checkpointing=true",
)  # fmt: skip


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tokenizer):
    """DDP, FSDP and ZeRO-3 runs of 2 processes with every adapter setting that shards, from one checkpoint:
    FSDP reads it on rank 0 only (the others hold empty tensors when peft computes DoRA's magnitudes, until
    accelerate broadcasts rank 0's), ZeRO-3 partitions it while reading (peft gathers each weight for them,
    and DeepSpeed gathers the base weight DoRA's forward reads as an external parameter)."""
    from test_launch import launched

    checkpoint = tmp_path_factory.mktemp("checkpoint")
    config = load_config(composed())
    build_model(config.model, tokenizer, dtype=torch.float32, seed=0).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    runs = {
        name: launched(tmp_path_factory.mktemp(name), name, *SHARDED, f"model.path={checkpoint}")
        for name in ("ddp", "fsdp", "zero3")
    }
    return checkpoint, runs


@pytest.mark.slow
def test_dora_and_loraplus_train_under_fsdp_and_zero3_as_under_ddp(launches, tokenizer):
    from test_launch import losses

    checkpoint, runs = launches
    (ddp_dir, _), expected = runs["ddp"], losses(runs["ddp"][0])
    assert list(expected) == [1, 2, 3, 4] and expected[4] < expected[1] - 0.3
    ddp_adapter = load_file(ddp_dir / "adapter" / "adapter_model.safetensors")
    # 2 layers x 7 Linears x (A, B, magnitude), and the LM head's trained copy
    assert len(ddp_adapter) == 2 * 7 * 3 + 1
    sharding = {
        "fsdp": "engine FSDP, backend gloo, model FSDPPeftModelForCausalLM, 64/64 parameters DTensor shards",
        "zero3": "engine DEEPSPEED, backend gloo, model DeepSpeedEngine, ZeRO-3, offload optimizer none, "
        "parameters none, 64/64 parameters partitioned",
    }
    for name in ("fsdp", "zero3"):
        run_dir, log = runs[name]
        assert f"launch={name}: 2 process(es), {sharding[name]}" in log
        for step, loss in losses(run_dir).items():
            assert loss == pytest.approx(expected[step], abs=1e-4), (name, step)
        adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == ddp_adapter.keys()
        for key, tensor in ddp_adapter.items():
            torch.testing.assert_close(adapter[key], tensor, atol=1e-4, rtol=1e-4)
    assert "checkpoint read by local rank 0, broadcast to the others (FSDP)" in runs["fsdp"][1]
    assert "weights partitioned while read (DeepSpeed ZeRO-3 zero.Init)" in runs["zero3"][1]
    base = build_model(load_config(composed(f"model.path={checkpoint}")).model, tokenizer,
                       dtype=torch.float32, seed=0)  # fmt: skip
    tuned = PeftModel.from_pretrained(base, runs["zero3"][0] / "adapter")
    magnitudes = [p for n, p in tuned.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 14 and tuned.peft_config["default"].use_rslora
