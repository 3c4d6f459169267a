"""QLoRA's loading under FSDP and ZeRO-3 (train/model/quantized_loading.py): the skeleton is the model
from_pretrained quantizes, holding no weight; filled once the engine has sharded it, it computes the same
logits. The 2-process proof (pages read, memory per rank, losses) is tests/test_placement.py's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from train.model.quantized_loading import QUANTIZED_LOAD, CheckpointKeyError, quantized_skeleton

QUANTIZATION = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_the_skeleton_is_the_quantized_model_without_its_weights(checkpoint):
    from bitsandbytes.nn import Linear4bit, Params4bit

    cpu = {"": torch.device("cpu")}
    loaded = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=QUANTIZATION, device_map=cpu, use_kernels=False
    )
    skeleton = quantized_skeleton(str(checkpoint), QUANTIZATION, torch.float32, "sdpa")
    ours, theirs = dict(skeleton.named_parameters()), dict(loaded.named_parameters())
    assert list(ours) == list(theirs)
    for name, parameter in ours.items():
        assert parameter.numel() == theirs[name].numel() and parameter.dtype == theirs[name].dtype, name
        assert type(parameter) is type(theirs[name]) and parameter.device.type == "cpu", name
    quantized = [m for m in skeleton.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14 and all(m.weight.bnb_quantized for m in quantized)  # 2 layers x 7 Linears
    assert all(isinstance(m.weight, Params4bit) and m.weight.quant_state is None for m in quantized)
    assert skeleton.is_loaded_in_4bit and skeleton.hf_quantizer is not None
    assert skeleton.config.quantization_config.bnb_4bit_quant_type == "nf4"
    plan = getattr(skeleton, QUANTIZED_LOAD)
    assert [key for _, _, key, _ in plan.weights] == list(theirs)  # every weight once, by its checkpoint key
    assert sum(recipe is not None for *_, recipe in plan.weights) == 14


def test_a_checkpoint_without_a_weight_is_refused_before_anything_is_read(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointKeyError) as error:
        quantized_skeleton(str(tmp_path), QUANTIZATION, torch.float32, "sdpa")
    assert str(error.value).startswith(
        f"{tmp_path}: the checkpoint has no model.layers.1.mlp.down_proj.weight"
    )
    assert "(1 of the 21 weights a LlamaForCausalLM needs)" in str(error.value)


@pytest.mark.parametrize("kept", ["model.embed_tokens.weight", "lm_head.weight"])
def test_a_tied_checkpoint_is_read_under_whichever_name_it_kept(tmp_path, kept):
    """Llama 3.2 1B/3B: one tensor for embedding and LM head. save_pretrained keeps the embedding's name,
    safetensors' save_model may keep the LM head's; the skeleton holds it once and reads it by either."""
    from safetensors.torch import save_file

    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    weights = LlamaForCausalLM(config).state_dict()
    dropped = ({"model.embed_tokens.weight", "lm_head.weight"} - {kept}).pop()
    del weights[dropped]
    save_file({k: t.contiguous() for k, t in weights.items()}, tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path)
    skeleton = quantized_skeleton(str(tmp_path), QUANTIZATION, torch.float32, "sdpa")
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    keys = [key for _, _, key, _ in getattr(skeleton, QUANTIZED_LOAD).weights]
    assert len(keys) == 20 and kept in keys and dropped not in keys  # 21 less the tied one


FILLED = """
import sys, torch
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
sys.path.insert(0, {tests!r})
from test_quantized_loading import QUANTIZATION
from train.model.quantized_loading import QUANTIZED_LOAD, load_quantized_shards, quantized_skeleton
torch.distributed.init_process_group("gloo")
path = {path!r}
skeleton = quantized_skeleton(path, QUANTIZATION, torch.float32, "sdpa")
for layer in skeleton.model.layers:
    fully_shard(layer)
fully_shard(skeleton)
load_quantized_shards(getattr(skeleton, QUANTIZED_LOAD), torch.device("cpu"))
loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=QUANTIZATION,
                                              device_map={{"": torch.device("cpu")}}, use_kernels=False)
# the skeleton keeps bitsandbytes' plain CPU kernel (quantized_skeleton: the AVX512-BF16 repack at the first
# forward without gradients would read garbage after a gather); from_pretrained's model must compute with
# the same one, or the two differ by that kernel's rounding (0.0106 on this checkpoint), whatever loaded them
for module in loaded.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
ids = torch.arange(40).reshape(2, 20) * 7
with torch.no_grad():
    print("difference", (skeleton(ids).logits - loaded(ids).logits).abs().max().item())
"""


@pytest.mark.slow
def test_filled_under_fsdp_by_two_processes_it_computes_what_from_pretrained_loads(checkpoint, tmp_path):
    """Two real processes (torchrun, gloo): the skeleton sharded by FSDP2's fully_shard, filled by rank 0's
    quantization; each rank's logits equal from_pretrained's quantized model's exactly."""
    script = tmp_path / "filled.py"
    script.write_text(FILLED.format(tests=str(REPO / "tests"), path=str(checkpoint)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("difference 0.0") == 2, result.stdout
