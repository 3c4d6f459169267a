"""The GPU fast path (train/model/fast_path.py): each switch decided from the device in one place, refused at
start where it cannot run, handed to TRL's own arguments, and counted by the planner. The kernels themselves
(Liger's Triton kernels, TRL's CUDA-stream offloading) need a GPU: bench/gpu_recipe.py runs them there."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_config import composed

from train.config import ConfigError, load_config
from train.model.fast_path import fast_path, resolve
from train.plan import GIB
from train.plan.memory import (
    Kernels,
    activation_bytes,
    attention_mask_bytes,
    offloaded_activation_bytes,
    per_gpu_bytes,
)
from train.run.trainer import training_args

LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None


def training(*overrides: str):
    return load_config(composed(*overrides)).training


def test_auto_is_the_plain_path_on_a_cpu_and_the_fast_one_on_a_gpu():
    auto = training()
    assert resolve(auto, "sft", "sdpa", on_gpu=False).trl_settings() == {
        "packing": False, "use_liger_kernel": False, "activation_offloading": False,
    }  # fmt: skip
    on_gpu = resolve(auto, "sft", "sdpa", on_gpu=True)
    assert on_gpu.packing and on_gpu.use_liger_kernel == LIGER_INSTALLED
    assert not resolve(auto, "dpo", "sdpa", on_gpu=True).packing  # preference rows are never packed
    forced = resolve(
        training("training.packing=true", "training.use_liger_kernel=false"), "sft", "sdpa", False
    )
    assert forced.packing and not forced.use_liger_kernel
    assert "sdpa with a block-diagonal mask from position_ids" in forced.describe()
    flash = resolve(auto, "sft", "flash_attention_2", on_gpu=True)
    assert "FlashAttention-2 varlen keeps sequences apart" in flash.describe()


def test_the_switches_reach_trls_arguments(tmp_path):
    args = training_args(load_config(composed("training.packing=true")), tmp_path, torch.float32)
    assert (args.packing, args.use_liger_kernel, args.activation_offloading) == (True, False, False)
    args = training_args(load_config(composed()), tmp_path, torch.float32)  # auto, here on a CPU
    assert (args.packing, args.use_liger_kernel) == (False, False)
    dpo = training_args(load_config(composed("stage=dpo", "data=preference_sample")), tmp_path, torch.float32)
    assert not hasattr(dpo, "packing") and dpo.use_liger_kernel is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.use_liger_kernel=true"],
         "training.use_liger_kernel=true: Liger's kernels are Triton kernels for a CUDA GPU and this machine "
         "has none; use training.use_liger_kernel=auto (on where they run) or false"),
        (["training.activation_offloading=true"],
         "training.activation_offloading=true: TRL offloads activations with CUDA streams and this machine "
         "has no CUDA GPU"),
    ],
)  # fmt: skip
def test_what_cannot_run_on_this_cpu_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fast_path(training(*overrides), "sft", "sdpa", on_gpu=False)


@pytest.mark.skipif(LIGER_INSTALLED, reason="liger-kernel is installed here")
def test_liger_asked_for_on_a_gpu_without_it_names_the_package():
    with pytest.raises(
        ConfigError, match=r"liger-kernel is not installed; pip install 'liger-kernel~=0\.8\.5'"
    ):
        fast_path(training("training.use_liger_kernel=true"), "sft", "sdpa", on_gpu=True)


def test_bad_values_and_packing_a_preference_stage_fail_when_the_config_loads():
    with pytest.raises(ConfigError, match="training.packing: 'sometimes'; use auto"):
        load_config(composed("training.packing=sometimes"))
    with pytest.raises(ConfigError, match="training.packing: SFT only; stage=dpo"):
        load_config(composed("stage=dpo", "data=preference_sample", "training.packing=true"))


# ── what the planner counts for each switch (8B widths, bf16, 16,384 tokens) ─────────────────────────────
def planned(*overrides: str):
    config = load_config(composed("model=8b", "model.dtype=bfloat16", *overrides), check=False)
    return config.model, config.method


def test_liger_keeps_the_norm_inputs_as_they_are_and_recomputes_silu():
    model, method = planned("method=qlora")
    tokens, hidden, intermediate = 16_384, model.hidden_size, model.intermediate_size
    plain = activation_bytes(model, method, tokens, checkpointing=False)
    liger = activation_bytes(model, method, tokens, checkpointing=False, kernels=Kernels(liger=True))
    # per layer and token: each RMSNorm's fp32 input copy (4H) becomes the bf16 input (2H) plus a 4-byte
    # reciprocal RMS, and SwiGLU keeps no silu(gate) (2I)
    saved = 2 * (4 * hidden - 2 * hidden - 4) + 2 * intermediate
    assert plain - liger == tokens * model.num_hidden_layers * saved


def test_offloading_moves_the_layer_inputs_to_host_ram():
    model, method = planned("method=qlora")
    tokens, layers, hidden = 131_072, model.num_hidden_layers, model.hidden_size
    kept = activation_bytes(model, method, tokens, checkpointing=True)
    offload = Kernels(offload=True)
    on_gpu = activation_bytes(model, method, tokens, checkpointing=True, kernels=offload)
    host = offloaded_activation_bytes(model, method, tokens, True, "single", offload)
    assert host == tokens * layers * 2 * hidden  # every layer's bf16 input
    stash = 5 * 2 * hidden * tokens  # the offloader's five tensors in flight (trl: max_fwd_stash_size)
    assert kept - on_gpu == host - stash
    parts = per_gpu_bytes(model, method, "single", 1, tokens=tokens, optim="adamw_torch", kernels=offload)
    assert parts["offloaded_activations"] == host and parts["activations"] == on_gpu


def test_packed_rows_under_sdpa_count_their_block_mask():
    assert attention_mask_bytes(16_384, 1, 2, Kernels(packed_mask=True)) == 16_384**2 * 3  # bool + bf16 bias
    assert attention_mask_bytes(16_384, 1, 2, Kernels()) == 0  # flash-attn varlen, or one sequence per row
    model, method = planned("method=qlora")
    parts = per_gpu_bytes(model, method, "single", 1, tokens=2 * 4096, optim="adamw_torch", seq_len=4096,
                          kernels=Kernels(packed_mask=True))  # fmt: skip
    assert parts["attention_mask"] == 2 * 4096**2 * 3


def test_the_planner_finds_131072_tokens_of_8b_qlora_in_80_gib_with_offloading():
    """Issue 14's long-context target as planned: 8B QLoRA, one sequence of 131,072 tokens, one 80 GiB
    GPU. bench/gpu_recipe.py measures it on a real GPU."""
    from train.plan.__main__ import context_table

    table = context_table([], {"gpu_memory": "80GB", "batch": "1"})
    row = next(r for r in table["rows"] if (r["model"], r["method"]) == ("8b", "qlora"))
    assert row["max_context_offloaded"] == 131_072 and row["peak_bytes_per_gpu_offloaded"] < 72 * GIB
    assert 64 * 1024 <= row["max_context"] < 131_072  # without offloading (nor Liger, not installed here)
    assert row["host_bytes_offloaded"] == 131_072 * 32 * 2 * 4096


# ── context parallelism (launch.cp_size): configured, checked and planned here; it runs on GPUs only ─────
CP = ("launch=fsdp", "launch.num_processes=8", "launch.cp_size=4")


def test_context_parallelism_reaches_accelerate_and_trl(tmp_path):
    from launch.__main__ import process_arguments

    config = load_config(composed(*CP))
    arguments = process_arguments(config)
    assert arguments[arguments.index("--num_processes") :] == [
        "--num_processes", "8", "--num_machines", "1", "--use_parallelism_config",
        "--parallelism_config_dp_shard_size", "2", "--parallelism_config_cp_size", "4",
    ]  # fmt: skip
    assert config.model.attn_implementation == "sdpa"  # auto: torch shards SDPA only
    on_gpu = resolve(config.training, "sft", "sdpa", on_gpu=True, context_parallel=4)
    assert not on_gpu.packing  # auto: context parallelism keeps whole causal sequences
    with pytest.raises(ConfigError, match="launch.cp_size=4: torch's context parallelism shards SDPA's CUDA"):
        training_args(config, tmp_path, torch.float32)  # this CPU: each rank would see its own shard only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("launch=zero3", "launch.num_processes=8", "launch.cp_size=4"),
         "launch.cp_size=4: context parallelism runs over FSDP2 (accelerate); use launch=fsdp"),
        (("launch=fsdp", "launch.num_processes=6", "launch.cp_size=4"),
         "launch.cp_size=4: 6 process(es) do not split into groups of 4"),
        ((*CP, "training.packing=true"), "launch.cp_size=4: context parallelism keeps only causal masks"),
        ((*CP, "model.attn_implementation=flash_attention_2"), "context parallelism shards SDPA only"),
        ((*CP, "stage=dpo", "data=preference_sample"), "launch.cp_size=4: SFT only (stage=dpo)"),
    ],
)  # fmt: skip
def test_context_parallelism_it_cannot_run_is_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(composed(*overrides))


def test_context_parallelism_divides_what_each_token_costs_per_gpu():
    from train.plan import plan_memory
    from train.plan.device import Device

    def plan(cp: int):
        config = load_config(composed("model=8b", "method=qlora", "launch=fsdp", "launch.num_processes=8",
                                      f"launch.cp_size={cp}"), check=False)  # fmt: skip
        return plan_memory(config.model, config.method, config.launch, seq_len=131_072, batch=1,
                           device=Device.gpu(80 * GIB)).per_gpu_bytes  # fmt: skip

    alone, split = plan(1), plan(8)
    assert split["activations"] * 8 == pytest.approx(alone["activations"], rel=1e-6)
    assert split["weights"] == alone["weights"]  # FSDP shards over all 8 GPUs either way


def test_flash_attention_asked_without_flash_attn_is_refused_not_fetched_from_the_hub():
    """transformers would swap in a kernels-community flash-attn fetched from the Hub; refused before
    anything loads, with the fix (flash-attn is not installed on this machine)."""
    config = load_config(composed("model.attn_implementation=flash_attention_2"))
    with pytest.raises(ConfigError) as error:
        fast_path(config.training, "sft", "flash_attention_2", on_gpu=True)
    message = str(error.value)
    assert "model.attn_implementation=flash_attention_2: no flash-attn package that transformers" in message
