"""The memory planner: exact architecture figures, the launch post's tables, fits, messages, the CLI."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train
from omegaconf import OmegaConf
from test_config import composed

from train.config import load_config
from train.plan import (
    GIB,
    Device,
    checkpoint_bytes,
    count_parameters,
    fit_problems,
    host_memory_bytes,
    kv_cache_bytes_per_token,
    largest_unit,
    lora_parameters,
    nf4_bytes,
    parse_memory,
    per_gpu_bytes,
    plan_memory,
    weight_bytes,
)

PARAMETERS = {
    "1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248, "70b": 70_553_706_496,
    "70b_3_3": 70_553_706_496, "405b": 405_853_388_800,
}  # fmt: skip
# The launch post's KV-cache table (GB as printed there); docs/memory.md explains its units.
POST_KV = {"8b": (0.125, 1.95, 15.62), "70b": (0.313, 4.88, 39.06), "405b": (0.984, 15.38, 123.05)}


GPU_80GB = Device.gpu(80 * GIB)


def config_for(*overrides: str):
    return load_config(composed(*overrides), check=False)


def on_gpu(config):
    """The config's model with ``dtype: auto`` as a GPU resolves it (bf16)."""
    return GPU_80GB.resolve(config.model)


def plan(*overrides: str, seq_len: int = 1024, batch: int = 1, device: Device | None = None):
    config = config_for(*overrides)
    return plan_memory(
        config.model, config.method, config.launch, seq_len=seq_len, batch=batch,
        optim=config.training.optim, device=device,
    )  # fmt: skip


@pytest.mark.parametrize("size", PARAMETERS)
def test_parameter_count_is_derived_exactly(size):
    model = config_for(f"model={size}").model
    assert count_parameters(model) == PARAMETERS[size]
    assert weight_bytes(model)["bf16"] == 2 * PARAMETERS[size]
    assert weight_bytes(model)["fp8"] == PARAMETERS[size]
    assert weight_bytes(model)["int4"] == PARAMETERS[size] // 2


def test_kv_cache_per_token_is_two_layers_kv_heads_head_dim_bf16():
    assert kv_cache_bytes_per_token(config_for("model=8b").model) == 131_072 == 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(config_for("model=70b").model) == 2 * 80 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(config_for("model=405b").model) == 2 * 126 * 8 * 128 * 2


@pytest.mark.parametrize("size", ["8b", "70b"])
def test_kv_table_reproduces_the_launch_post(size):
    # The post's "1k" is 1,024 tokens, its "16k"/"128k" are 16,000/128,000, and its "GB" is GiB.
    per_token = kv_cache_bytes_per_token(config_for(f"model={size}").model)
    for tokens, printed in zip((1024, 16_000, 128_000), POST_KV[size], strict=True):
        digits = len(str(printed).split(".")[1])
        assert abs(tokens * per_token / GIB - printed) <= 10**-digits / 2 + 1e-12  # as printed, half up


def test_post_405b_kv_row_counts_twice_the_kv_heads():
    # Its whole row is 1,032,192 bytes a token: 16 KV heads, not the 8 of the released architecture.
    per_token = kv_cache_bytes_per_token(config_for("model=405b").model)
    for tokens, printed in zip((1024, 16_000, 128_000), POST_KV["405b"], strict=True):
        assert 2 * tokens * per_token / GIB == pytest.approx(printed, abs=0.005)


def test_nf4_double_quant_costs_its_bitsandbytes_bytes():
    elements = 4096 * 14336
    assert nf4_bytes(elements) / elements == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    model = config_for("model=8b").model
    unquantized = 2 * 128_256 * 4096 + 65 * 4096  # embeddings, LM head, 2 norms x 32 layers, final norm
    quantized = PARAMETERS["8b"] - unquantized
    assert weight_bytes(model)["nf4_bnb"] == pytest.approx(
        quantized * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * unquantized, rel=1e-6
    )


def peft_trainable(model_cfg, tokenizer, r: int, target_modules, **lora) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from train.model.build import llama_config

    with torch.device("meta"):
        model = get_peft_model(
            LlamaForCausalLM(llama_config(model_cfg, tokenizer)),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, task_type="CAUSAL_LM", **lora),
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_trainable_parameters_match_peft(tokenizer):
    config = config_for("model=8b", "method=lora")
    assert lora_parameters(config.model, config.method) == 13_631_488
    assert peft_trainable(config.model, tokenizer, 16, list(config.method.target_modules)) == 13_631_488
    tiny = config_for("method=lora", "method.target_modules=all-linear")
    assert lora_parameters(tiny.model, tiny.method) == peft_trainable(tiny.model, tokenizer, 16, "all-linear")


def test_unknown_lora_target_names_the_key():
    config = config_for("method=lora", "method.target_modules=[qkv]")
    with pytest.raises(ValueError, match=r"method.target_modules: \['qkv'\]"):
        lora_parameters(config.model, config.method)


def test_sharding_shrinks_the_70b_full_peak():
    config = config_for("model=70b", "method=full")
    peaks = {
        s: per_gpu_bytes(on_gpu(config), config.method, s, 8, tokens=1024, optim="adamw_torch")["peak"]
        for s in ("single", "ddp", "zero2", "fsdp", "zero3")
    }
    assert peaks["zero3"] < peaks["zero2"] < peaks["ddp"]
    assert peaks["fsdp"] < peaks["ddp"] and peaks["single"] < peaks["ddp"]  # ddp adds its gradient buckets


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero2", "zero3"])
def test_precision_policy_bytes_per_full_parameter(strategy):
    """docs/memory.md, "Precision policy": fp32 master weights, gradients and moments on every launch."""
    config = config_for("model=70b", "method=full")
    params, shards = PARAMETERS["70b"], 1 if strategy in ("single", "ddp") else 8
    parts = per_gpu_bytes(on_gpu(config), config.method, strategy, 8, tokens=1024, optim="adamw_torch")
    expected = {  # bytes a parameter: weights, gradients, fp32 master, moments
        "single": (4, 4, 0, 8),  # fp32 weights under bf16 autocast: they are their own master copy
        "ddp": (4, 4, 0, 8),
        "fsdp": (4, 4, 0, 8),  # accelerate upcasts the trainable shards to fp32; compute is FSDP2's bf16
        "zero2": (2 * 8, 2, 4, 8),  # bf16 weights replicated (hence x 8 shards), the rest sharded
        "zero3": (2, 2, 4, 8),
    }[strategy]
    for part, per_param in zip(("weights", "gradients", "master", "optimizer"), expected, strict=True):
        assert parts[part] == pytest.approx(per_param * params / shards, rel=1e-6), part
    # bf16 copies of the decoder Linears that autocast keeps for the backward, only where weights are fp32
    assert (parts["autocast_copies"] > 0) == (strategy in ("single", "ddp"))


@pytest.mark.parametrize(("strategy", "per_param"), [("fsdp", 12), ("zero3", 14)])
def test_a_70b_full_checkpoint_is_its_trainable_state(strategy, per_param):
    """fp32 weights (torch engines) or bf16 weights + fp32 master (DeepSpeed), and two fp32 moments:
    0.85 TB under FSDP, what a stop request must write within Slurm's warning (launch/slurm.py)."""
    config = config_for("model=70b", "method=full")
    full = checkpoint_bytes(on_gpu(config), config.method, strategy, "adamw_torch")
    assert full == per_param * PARAMETERS["70b"]
    lora = config_for("model=70b", "method=lora")
    adapter = checkpoint_bytes(on_gpu(lora), lora.method, "fsdp", "adamw_torch")
    assert adapter == 12 * lora_parameters(lora.model, lora.method)  # the frozen base is not in it


def test_lora_and_qlora_adapters_are_fp32_on_every_launch():
    for method in ("lora", "qlora"):
        config = config_for("model=8b", f"method={method}")
        adapters = lora_parameters(config.model, config.method)
        model, optim = on_gpu(config), "adamw_torch"
        for strategy in ("single", "fsdp"):
            parts = per_gpu_bytes(model, config.method, strategy, 1, tokens=1024, optim=optim)
            held = (parts["gradients"], parts["optimizer"], parts["master"])
            assert held == (4 * adapters, 8 * adapters, 0)
        zero3 = per_gpu_bytes(model, config.method, "zero3", 1, tokens=1024, optim=optim)
        assert (zero3["gradients"], zero3["master"]) == (2 * adapters, 4 * adapters)  # DeepSpeed: bf16, fp32


def test_zero_states_follow_deepspeeds_own_estimate():
    """DeepSpeed's estimates (2 bf16 weights + 18 = 2 bf16 grads + 4 fp32 grads + 4 fp32 master + 8 moments)
    against what its ZeRO optimizers allocate (deepspeed 0.19.8): the fp32 gradient partition exists only
    during the step (step_temporaries, next to the foreach temporary of torch's AdamW, the optimizer the
    Trainer hands DeepSpeed); ZeRO-3 keeps a bf16 gradient partition (stage3.py grad_partitions_flat_buffer)
    and makes fp32 gradients one sub-group of 1e9 elements at a time."""
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    config = config_for("model=70b", "method=full")
    params, shard = PARAMETERS["70b"], PARAMETERS["70b"] / 8

    def parts(strategy):
        return per_gpu_bytes(on_gpu(config), config.method, strategy, 8, tokens=1024, optim="adamw_torch")

    def states(strategy):
        held = parts(strategy)
        return sum(held[k] for k in ("weights", "gradients", "master", "optimizer", "gathered_unit"))

    _, expected = zero2.estimate_zero2_model_states_mem_needs(params, 8, 1, cpu_offload=False)
    assert states("zero2") + 4 * shard == pytest.approx(expected, abs=16)
    assert parts("zero2")["step_temporaries"] == pytest.approx((4 + 4) * shard, abs=16)
    _, expected, _ = zero3.estimate_zero3_model_states_mem_needs(
        params, largest_unit(config.model), 8, 1, cpu_offload=False
    )
    assert states("zero3") + 4 * shard == pytest.approx(expected + 2 * shard, abs=16)
    assert parts("zero3")["step_temporaries"] == (4 + 4) * 10**9  # one sub-group: fp32 grads + foreach


def test_405b_full_needs_several_nodes_of_80gb_gpus():
    result = plan("model=405b", "method=full")
    assert not result.fits and result.peak_bytes_per_gpu > 3000 * GIB
    assert result.recommended.nodes > 1 and result.recommended.gpus == 8 * result.recommended.nodes
    assert result.recommended.launch in ("fsdp", "zero3")
    assert result.recommended.peak_bytes_per_gpu <= 0.9 * 80 * GIB


def test_8b_qlora_fits_one_24gb_gpu():
    result = plan("model=8b", "method=qlora", device=Device.gpu(24 * GIB))
    assert result.fits and 5 * GIB < result.peak_bytes_per_gpu < 12 * GIB
    assert (result.recommended.gpus, result.recommended.launch) == (1, "local")


def test_every_recommended_launch_is_a_conf_file_with_that_strategy():
    for size in PARAMETERS:
        for method in ("full", "lora", "qlora"):
            rec = plan(f"model={size}", f"method={method}").recommended
            launch = OmegaConf.load(REPO / "conf" / "launch" / f"{rec.launch}.yaml")
            assert launch.strategy == rec.strategy


def test_offload_keeps_one_unit_on_the_gpu_and_reports_cpu_memory():
    result = plan("model=70b", "method=full", "launch=zero3_offload")
    assert result.per_gpu_bytes["weights"] == result.per_gpu_bytes["optimizer"] == 0
    assert result.per_gpu_bytes["gathered_unit"] > 0
    # bf16 weights and gradient partition, fp32 gradients (kept between steps when offloaded), master, moments
    assert result.cpu_bytes_per_node == (2 + 2 + 4 + 4 + 8) * PARAMETERS["70b"]


def configured_gpu_problems(*overrides: str) -> list[str]:
    config = config_for(*overrides)
    return fit_problems(config, Device.configured(config.launch))


def test_fit_problems_name_the_key_the_figures_and_a_fix():
    assert configured_gpu_problems() == []  # the tiny default run
    [problem] = configured_gpu_problems("model=405b", "method=full")
    assert problem.startswith("launch: model=405b method=full does not fit launch=local on 1 GPU")
    assert "planner figures: peak" in problem
    assert (
        "GiB per GPU in bfloat16 (model.dtype=auto) vs 72.00 GiB usable of 80 GiB GPUs (launch.gpu_memory_gb)"
        in problem
    )
    assert "try: launch=fsdp launch.num_processes=8 launch.num_machines=" in problem


def test_fit_problems_refuse_qlora_with_parameter_offload():
    [problem] = configured_gpu_problems("model=70b", "method=qlora", "launch=zero3_offload")
    assert problem.startswith("launch.strategy: QLoRA's 4-bit weights (bitsandbytes Params4bit)")
    assert "planner figures: peak" in problem and "try: launch=fsdp or launch=zero3 with 8 GPUs" in problem
    assert configured_gpu_problems("model=70b", "method=qlora", "launch=zero3") == []


# ── the device the run computes on ──────────────────────────────────────────────────────
CPU_24GB = Device("cpu", 24 * GIB, "float32", "a CPU with 24 GiB RAM")


def test_a_cpu_plans_fp32_in_host_ram_shared_by_its_processes():
    config = config_for("model=8b")
    cpu = plan_memory(config.model, config.method, config.launch, seq_len=512, batch=2, device=CPU_24GB)
    gpu = plan_memory(config.model, config.method, config.launch, seq_len=512, batch=2, device=GPU_80GB)
    assert (cpu.compute_dtype, gpu.compute_dtype) == ("float32", "bfloat16")  # model.dtype=auto
    assert cpu.per_gpu_bytes["weights"] == 4 * PARAMETERS["8b"] + 4 * cpu.trainable_params
    assert gpu.per_gpu_bytes["weights"] == 2 * PARAMETERS["8b"] + 4 * gpu.trainable_params
    two = config_for("model=8b", "launch=ddp", "launch.num_processes=2")
    shared = plan_memory(two.model, two.method, two.launch, seq_len=512, batch=2, device=CPU_24GB)
    assert shared.gpu_memory_bytes == 12 * GIB and shared.usable_bytes == int(0.9 * 12 * GIB)


def test_8b_on_a_24gb_cpu_is_refused_with_what_would_fit():
    config = config_for("model=8b")
    [problem] = fit_problems(config, CPU_24GB)
    assert problem.startswith(
        "launch: model=8b method=lora does not fit launch=local on a CPU with 24 GiB RAM, 1 process "
        "(planner figures: peak "
    )
    assert (
        "GiB per process in float32 (model.dtype=auto) vs 21.60 GiB usable (0.9 x 24.00 GiB RAM / 1 process)"
        in problem
    )
    assert "try: method=qlora (peak " in problem and "GiB per process here)" in problem
    assert (
        "or a GPU machine: launch=local launch.num_processes=1 launch.num_machines=1 (1 GPU on 1 node) of "
        "80 GiB GPUs (launch.gpu_memory_gb)" in problem
    )
    assert problem.endswith("or model=tiny (the default) to try the pipeline on this CPU")
    assert fit_problems(config_for(), CPU_24GB) == []  # the default run


def test_local_device_is_this_machine():
    device = Device.local()
    if torch.cuda.is_available():
        assert device.memory_bytes == torch.cuda.get_device_properties(0).total_memory
    else:
        assert (device.kind, device.compute_dtype) == ("cpu", "float32")
        assert device.memory_bytes == host_memory_bytes()
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        assert host_memory_bytes() <= int(meminfo["MemTotal"].split()[0]) * 1024


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without a GPU")
def test_python_m_train_8b_is_refused_on_this_cpu_before_building_anything(tmp_path):
    result = run_train("model=8b", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "launch: model=8b method=lora does not fit launch=local on this machine's CPU (no CUDA GPU;" in (
        result.stderr
    )
    assert "GiB per process in float32 (model.dtype=auto) vs " in result.stderr
    assert "or a GPU machine: launch=local launch.num_processes=1" in result.stderr
    assert "model=tiny" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/*/*/config.yaml"))  # refused before the run began


def test_python_m_launch_plans_the_configured_gpus(tmp_path):
    """A login node plans a job for the GPUs it asks for, whatever it has itself, without importing torch."""
    script = (
        "import sys; from launch.__main__ import main; "
        "code = main(['model=8b', 'launch=fsdp', 'launch.num_processes=2']); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("accelerate launch ") and result.stdout.endswith("no torch\n")
    refused = subprocess.run(
        [sys.executable, "-m", "launch", "model=70b", "method=full", "launch.gpu_memory_gb=24"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "usable of 24 GiB GPUs (launch.gpu_memory_gb)" in refused.stderr


def test_parse_memory_reads_binary_sizes():
    assert parse_memory("80GB") == parse_memory("80") == parse_memory("80 GiB") == 80 * GIB
    assert parse_memory("1.5TB") == 1536 * GIB and parse_memory("141gb") == 141 * GIB
    with pytest.raises(ValueError, match="gpu_memory: 'eighty'"):
        parse_memory("eighty")


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.plan", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_json_with_the_required_keys():
    result = run_plan("model=8b", "method=qlora", "output=json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["params"] == PARAMETERS["8b"] and out["kv_cache_bytes_per_token"] == 131_072
    assert set(out["weights_bytes"]) >= {"bf16", "fp8", "int4"}
    assert isinstance(out["peak_bytes_per_gpu"], int) and out["fits"] is True
    assert out["recommended"]["gpus"] == 1 and out["recommended"]["launch"] == "local"
    assert out["recommended"]["nodes"] == 1 and out["seq_len"] == 512  # training.max_length by default


def test_cli_recommends_several_nodes_for_405b_full():
    result = run_plan("model=405b", "method=full", "gpu_memory=80GB", "seq_len=1024", "batch=1")
    assert result.returncode == 0, result.stderr
    assert "parameters          405,853,388,800" in result.stdout
    assert "fits: NO" in result.stdout
    assert (
        "smallest setup that fits on 80 GiB GPUs: launch=fsdp launch.num_processes=8 launch.num_machines="
        in result.stdout
    )
    assert " nodes)" in result.stdout


def test_cli_names_a_bad_option():
    result = run_plan("gpu_memory=lots")
    assert result.returncode == 2 and "gpu_memory: 'lots' is not a size" in result.stderr
    result = run_plan("seq_len=1k")
    assert result.returncode == 2 and "seq_len: '1k' is not a positive whole number" in result.stderr


# ── on a GPU: the planner against the CUDA allocator's peak ────────────────────────────
GPU_RUNS = {
    "tiny-lora": ("method=lora",),
    "tiny-full": ("method=full",),
    "tiny-qlora": ("method=qlora",),
    "8b-wide-lora": ("model=8b", "model.num_hidden_layers=2", "model.gradient_checkpointing=false"),
    "8b-wide-full": ("model=8b", "model.num_hidden_layers=2", "method=full"),
    "8b-wide-qlora": ("model=8b", "model.num_hidden_layers=2", "method=qlora"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to measure max_memory_allocated")
@pytest.mark.parametrize("run", GPU_RUNS)
def test_planned_peak_bounds_a_real_training_run(run, tmp_path, tokenizer):
    from datasets import Dataset

    from train.model.build import build_model, compute_dtype
    from train.run.trainer import build_trainer, training_args

    seq_len, batch = (256, 2) if run.startswith("tiny") else (1024, 4)
    cfg = composed(
        "training.report_to=[]", f"training.max_length={seq_len}", "training.max_steps=3",
        f"training.per_device_train_batch_size={batch}", "training.save_steps=100", *GPU_RUNS[run],
    )  # fmt: skip
    cfg.output_dir = str(tmp_path)
    config = load_config(cfg)
    ids = torch.randint(0, 128_000, (4 * batch, seq_len), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "assistant_masks": torch.ones_like(ids).tolist()})
    # cuBLAS' workspaces (32 MiB for each of the forward and backward threads on Hopper) are runtime
    # overhead, like the CUDA context: the planner leaves them to usable_fraction, so allocate them first.
    gc.collect()
    warm = torch.ones(64, 64, device="cuda", requires_grad=True)
    (warm @ warm).sum().backward()
    del warm
    baseline = torch.cuda.memory_allocated()
    dtype = compute_dtype(config.model.dtype)
    model = build_model(config.model, tokenizer, dtype=dtype, seed=0, method=config.method)
    trainer = build_trainer(
        config, model, tokenizer, dataset, tmp_path, training_args(config, tmp_path, dtype)
    )
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
        measured = torch.cuda.max_memory_allocated() - baseline
    finally:
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
    planned = plan_memory(
        config.model, config.method, config.launch, seq_len=seq_len, batch=batch, optim=config.training.optim
    ).peak_bytes_per_gpu
    print(f"\nGPU-PEAK {run}: measured {measured / GIB:.3f} GiB, planned {planned / GIB:.3f} GiB")
    assert 0.8 * planned <= measured <= 1.05 * planned


def test_tied_embeddings_are_one_tensor_in_every_count():
    """Llama 3.2 1B/3B: the LM head is the embedding; weights, NF4 loads and full fine-tuning's states hold it
    once."""
    tied = config_for("model=1b").model
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    embedding = 128_256 * 2048
    assert count_parameters(untied) - count_parameters(tied) == embedding
    # kept bf16, unquantized
    assert weight_bytes(untied)["nf4_bnb"] - weight_bytes(tied)["nf4_bnb"] == 2 * embedding
    full = plan("model=1b", "method=full", device=GPU_80GB)
    assert full.trainable_params == PARAMETERS["1b"]


def test_recipes_are_listed_and_fit_the_gpus_they_name():
    """The Llama 3.2 recipes fit one consumer GPU at 2,048 tokens (1B: 8 GiB, 3B: 12 GiB); Llama 3.3 70B
    QLoRA one 80 GB GPU."""
    result = run_plan("recipes=true", "output=json")
    assert result.returncode == 0, result.stderr
    rows = {row["recipe"]: row for row in json.loads(result.stdout)["rows"]}
    expected = {"1b_lora_chat": 8, "1b_qlora_chat": 8, "3b_lora_chat": 12, "3b_qlora_chat": 12,
                "70b_3_3_qlora_chat": 80}  # fmt: skip
    for recipe, gpu in expected.items():
        row = rows[recipe]
        assert row["seq_len"] == 2048 and row["gpus"] == 1, row
        assert row["smallest_gpu_gib"] <= gpu and row["peak_bytes_per_gpu"] <= 0.9 * gpu * GIB, row
    assert rows["70b_3_3_qlora_chat"]["model"] == "70b_3_3"
    assert set(rows) == {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    text = run_plan("recipes=true").stdout
    assert "1b_lora_chat          1b       lora   sft   local x1    2,048    1 x 8" in text


def test_dora_counts_its_magnitudes_kept_outputs_and_weight_norm(tokenizer):
    """DoRA (method.use_dora) on 8B, q/k/v/o, one GPU, 1,024 tokens, checkpointing on (conf/model/8b.yaml),
    dropout 0.05 (conf/method/lora.yaml): a magnitude per output feature of each adapted Linear (as peft
    counts on a meta-device model), trained like the adapters (fp32 weight, gradient, two moments, the foreach
    temporary); per token of the recomputed layer the base output and B(A(x)) of each (2 x 2 bytes x out),
    and with dropout the weight the recomputing matmul keeps (2 bytes x in x out); the norm's transient at
    the largest adapted Linear (docs/memory.md, "DoRA")."""
    from train.plan.memory import dora_magnitude_parameters, dora_norm_bytes

    lora, dora = (
        config_for("model=8b", "method=lora"),
        config_for("model=8b", "method=lora", "method.use_dora=true"),
    )
    magnitudes = 32 * (4096 + 1024 + 1024 + 4096)
    assert dora_magnitude_parameters(dora.model, dora.method) == magnitudes == 327_680
    assert peft_trainable(dora.model, tokenizer, 16, list(dora.method.target_modules), use_dora=True) == (
        13_631_488 + magnitudes
    )
    before, after = (
        per_gpu_bytes(on_gpu(c), c.method, "single", 1, tokens=1024, optim="adamw_torch")
        for c in (lora, dora)
    )
    for part, per_param in (("weights", 4), ("gradients", 4), ("optimizer", 8), ("step_temporaries", 4)):
        assert after[part] - before[part] == per_param * magnitudes, part
    square = 4096 * 4096  # q_proj and o_proj; k_proj and v_proj are 4096 x 1024
    kept_outputs = 1024 * 2 * 2 * (4096 + 1024 + 1024 + 4096)  # one layer's, recomputed
    kept_weights = 2 * (square + 4096 * 1024 + 4096 * 1024 + square)
    assert after["activations"] - before["activations"] == kept_outputs + kept_weights == 125_829_120
    # eye(4096) fp32 + its bf16 cast (6 in^2); B A in bf16 and its fp32 cast (6), the base's fp32 cast (4),
    # scale x BA and W + scale x BA in fp32 (8)
    assert after["dora_norm"] == 24 * square == 402_653_184 and before["dora_norm"] == 0
    assert after["peak"] - before["peak"] == (
        4 * magnitudes  # weights
        + 8 * magnitudes  # moments
        + kept_outputs
        + kept_weights
        + 24 * square  # the backward's working set, which is the larger
    )
    qdora = config_for("model=8b", "method=qlora", "method.use_dora=true")
    # QLoRA's x stays bf16 (autocast): eye 6 in^2, B A 2, the dequantized weight 2, the norm's pair 4
    assert dora_norm_bytes(on_gpu(qdora), qdora.method) == 14 * square
    cpu = dataclasses.replace(dora.model, dtype="float32")  # LoRA in fp32: no casts, the weight itself kept
    assert dora_norm_bytes(cpu, dora.method) == 16 * square
    all_linear = config_for(
        "model=8b", "method=lora", "method.use_dora=true", "method.target_modules=all-linear"
    )
    # down_proj's A takes 14,336 inputs: eye(14336) dominates, 1.2 GB of bf16 + fp32 identity alone
    assert dora_norm_bytes(on_gpu(all_linear), all_linear.method) == 6 * 14_336**2 + 18 * 14_336 * 4096
