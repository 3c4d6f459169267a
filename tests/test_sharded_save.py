"""The streaming save: transformers' sharded checkpoint, written one tensor at a time, with bounded memory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_config import composed

from train.config import load_config
from train.model.build import build_model, build_peft_config
from train.model.sharded_save import full_shape, save_adapter, save_full_model, whole

# The 2-process full fine-tunes both this file and test_state_bytes read (conftest.shared_launch).
FULL_RUN = ("method=full", "training.save_steps=4", "training.max_shard_size=300KB")


def tiny_model(tokenizer, *overrides: str):
    config = load_config(composed(*overrides))
    return build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)


def load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, local_files_only=True)


def test_small_shards_make_an_index_that_transformers_loads(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    saved = save_full_model(model, tmp_path, is_writer=True, max_shard_size="300KB")

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(saved.files) > 3 and sorted(saved.files) == files
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", name) for name in files)
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    for name in files:  # every file holds what the index says, nothing else
        with safe_open(tmp_path / name, "pt") as file:
            assert sorted(file.keys()) == sorted(k for k, v in index["weight_map"].items() if v == name)
    # the two 65 MB vocabulary matrices are over 300 KB: each alone in its file; no file holds more than one
    assert saved.largest_buffer == saved.largest_tensor == 128256 * 128 * 4

    reloaded = load(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "generation_config.json").is_file()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_buffer_stays_within_the_shard_size_and_tied_embeddings_are_saved_once(tmp_path, tokenizer):
    model = tiny_model(tokenizer, "model.tie_word_embeddings=true")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.lm_head.weight.nbytes
    saved = save_full_model(model, tmp_path, is_writer=True, max_shard_size=embeddings + 1_000_000)

    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert (
        "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map
    )  # as save_pretrained
    assert len(saved.files) == 2 and saved.largest_buffer <= embeddings + 1_000_000
    reloaded = load(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_weights_are_written_in_the_save_dtype_and_an_earlier_save_is_replaced(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    save_full_model(model, tmp_path, is_writer=True, max_shard_size="300KB")
    save_full_model(model, tmp_path, is_writer=True, dtype=torch.bfloat16)

    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()  # it would point at the old files
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_a_rank_that_does_not_write_writes_nothing(tmp_path, tokenizer):
    save_full_model(tiny_model(tokenizer), tmp_path / "model", is_writer=False)
    assert not (tmp_path / "model").exists()


def trained_state(checkpoint) -> dict[str, torch.Tensor]:
    """The weights each rank held at a checkpoint, put together from the engine's own sharded files."""
    if (checkpoint / "pytorch_model_fsdp_0").is_dir():  # FSDP2: torch.distributed.checkpoint
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", checkpoint / "gathered.pt")
        return torch.load(checkpoint / "gathered.pt", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint)  # ZeRO-3 on CPU trains in fp32: exact


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_sharded_full_run_saves_the_trained_weights_shard_by_shard(shared_launch, tokenizer, name):
    """A real 2-process FSDP2 / ZeRO-3 full fine-tune: model/ is written one file at a time, never gathered
    whole on one process, loads in plain transformers, and holds exactly the weights the ranks trained
    (their sharded checkpoint at the last step, put together here offline)."""
    run_dir, log = shared_launch(name, *FULL_RUN)  # also read by test_state_bytes
    model_dir = run_dir / "model"
    files = sorted(path.name for path in model_dir.glob("model-*.safetensors"))
    assert len(files) > 3 and (model_dir / "model.safetensors.index.json").is_file()
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "config.json").is_file()
    assert not list(model_dir.glob("global_step*"))  # no DeepSpeed checkpoint in place of the weights
    # the writer held one file's tensors at a time: here each 65 MB vocabulary matrix alone
    held = re.search(r"saved \S+/model: \d+ safetensors file\(s\), \d+ bytes; held at most (\d+) bytes", log)
    assert held and int(held[1]) == 128256 * 128 * 4, log[-3000:]

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    saved, expected = model.state_dict(), trained_state(run_dir / "checkpoints" / "checkpoint-4")
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    base = tiny_model(tokenizer).state_dict()
    assert not any(torch.equal(saved[key], base[key]) for key in base if "layers" in key)  # it trained


@pytest.fixture(scope="module")
def deepspeed_world_of_one():
    """A one-process gloo world for DeepSpeed engines built in this process, torn down after this file's tests
    (once: DeepSpeed keeps the groups it made, which a second world would not know)."""
    import deepspeed

    from launch.__main__ import free_port

    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
             "WORLD_SIZE": "1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key, value in world.items():
            patch.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_adapter_under_deepspeed_is_the_fp32_master_not_the_engines_copy(
    deepspeed_world_of_one, tmp_path, tokenizer, stage
):
    """Under DeepSpeed the module's parameters are the engine's copies (bf16 on a GPU) and the fp32 masters
    live in the ZeRO optimizer's partitions. On CPU both are fp32 and equal after every step, so here each
    master is set apart from its copy (DeepSpeed's safe_set_full_fp32_param) to show which one adapter/ is."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param
    from peft import get_peft_model

    model = get_peft_model(tiny_model(tokenizer), build_peft_config(load_config(composed()).method))
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trained), config=ds_config)
    masters, generator = {}, torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            master = torch.randn(full_shape(parameter), generator=generator)
            safe_set_full_fp32_param(parameter, master)
            with whole(parameter) as copy:
                assert not torch.equal(copy, master)  # the engine's copy is another tensor
            masters[name.replace(".default", "")] = master  # peft's file names drop the adapter's name
    save_adapter(model, tmp_path, is_writer=True)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == masters.keys() and len(saved) == 16  # 2 layers x q,k,v,o x A,B
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name


@pytest.mark.slow
def test_zero3_lora_run_saves_the_fp32_masters(shared_launch):
    """The real 2-process ZeRO-3 LoRA run (test_launch's): adapter/ was read through DeepSpeed's fp32 accessor
    (its log says so), and holds, bit for bit, the fp32 masters DeepSpeed's own zero_to_fp32 puts together
    from the last checkpoint's optimizer states (step 4, the last step)."""
    from test_launch import SHARDED_RUN

    run_dir, log = shared_launch("zero3", *SHARDED_RUN)  # also read by test_launch and test_state_bytes
    adapter_dir = run_dir / "adapter"
    accessor = "16 of them DeepSpeed's fp32 master (safe_get_full_fp32_param)"
    assert f"saved {adapter_dir}: 16 adapter tensors, {accessor}" in log, log[-3000:]
    masters = {
        name.replace(".default", ""): tensor
        for name, tensor in trained_state(run_dir / "checkpoints" / "checkpoint-4").items()
        if "lora_" in name
    }
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == masters.keys() and len(saved) == 16
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name
