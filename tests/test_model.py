"""Model sizes and methods: exact architectures, safe loading, and what each method trains and saves."""

from __future__ import annotations

import pytest
import torch
from test_config import composed
from test_trainer import tiny_trainer

from train.config import ConfigError, load_config
from train.model.build import build_model, llama_config

# Parameter counts of Meta's released checkpoints: 3.1 and 3.3 untie embeddings and LM head, 3.2 1B/3B tie
# them (one tensor, counted once).
PARAMETERS = {
    "1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248, "70b": 70_553_706_496,
    "70b_3_3": 70_553_706_496, "405b": 405_853_388_800,
}  # fmt: skip
ROPE_FACTOR = {"1b": 32.0, "3b": 32.0}  # Llama 3.2 as released; 3.1 and 3.3: 8


@pytest.mark.parametrize("size", PARAMETERS)
def test_architecture_gives_the_real_parameter_count_without_memory(size, tokenizer):
    from transformers import LlamaForCausalLM

    config = load_config(composed(f"model={size}"))
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(config.model, tokenizer))
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[size]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert (
        model.config.rope_parameters["rope_type"] == "llama3"
        and model.config.max_position_embeddings == 131_072
    )
    assert model.config.rope_parameters["factor"] == ROPE_FACTOR.get(size, 8.0)
    tied = size in ("1b", "3b")
    assert config.model.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert config.model.chat_format == ("llama3.2" if tied else "llama3.1")


def test_local_checkpoint_loads_from_safetensors(tmp_path, tokenizer):
    config = load_config(composed())
    original = build_model(config.model, tokenizer, dtype=torch.float32, seed=1)
    original.save_pretrained(tmp_path)
    loaded_config = load_config(composed(f"model.path={tmp_path}"))
    loaded = build_model(loaded_config.model, tokenizer, dtype=torch.float32, seed=2)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_no_model_loads_hub_kernels_unless_the_user_asks(tmp_path, tokenizer, monkeypatch):
    """transformers 5 kernelizes every from_pretrained model by default (on CUDA: RMSNorm/RoPE from the Hub,
    again at each model.train()). Every load goes through train.model.build.load_safely: the checkpoint and
    the 4-bit paths reach set_use_kernels with False, and only USE_HUB_KERNELS=1 turns it on."""
    from transformers import PreTrainedModel

    from train.model.build import load_safely

    asked = []
    original = PreTrainedModel.set_use_kernels

    def recorded(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, False, *args, **kwargs)  # never fetch anything here

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", recorded)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    build_model(load_config(composed()).model, tokenizer, dtype=torch.float32, seed=1).save_pretrained(
        tmp_path
    )
    for method in ("lora", "qlora"):
        config = load_config(composed(f"model.path={tmp_path}", f"method={method}"))
        build_model(config.model, tokenizer, dtype=torch.float32, seed=1, method=config.method)
    assert asked == [False, False]
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert load_safely()["use_kernels"] is True


def test_pickle_checkpoints_are_refused_before_loading(tmp_path, tokenizer):
    config = load_config(composed())
    model = build_model(config.model, tokenizer, dtype=torch.float32, seed=1)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pickle format of older checkpoints
    with pytest.raises(ConfigError, match=r"model.path: no \*.safetensors weights in"):
        load_config(composed(f"model.path={tmp_path}"))


def train_briefly(tmp_path, tokenizer, method: str):
    trainer, _ = tiny_trainer(
        tmp_path, tokenizer, f"method={method}", "training.max_steps=3", "training.save_steps=100"
    )
    before = {name: bits(p) for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], bits(p))}
    return trainer, before, changed


def bits(parameter: torch.Tensor) -> torch.Tensor:
    """The raw bytes: 4-bit weights packed into float storage can read as NaN, and NaN != NaN."""
    return parameter.detach().contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_methods_train_only_the_adapter_and_save_only_it(tmp_path, tokenizer, method):
    trainer, before, changed = train_briefly(tmp_path, tokenizer, method)
    lora_b = {name for name in before if "lora_B" in name}
    assert lora_b and lora_b <= changed  # every adapter matrix moved
    assert all("lora_" in name for name in changed)  # and nothing else
    trainer.save_model(str(tmp_path / "adapter"))
    saved = sorted(p.name for p in (tmp_path / "adapter").glob("*.safetensors"))
    assert saved == ["adapter_model.safetensors"]
    # the adapter is fp32 on every device (TRL would leave a quantized model's adapter in bf16)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    if method == "qlora":
        import bitsandbytes as bnb

        base = trainer.model.get_base_model()
        assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
        assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
        assert base.model.layers[0].mlp.up_proj.weight.quant_type == "nf4"


def test_full_trains_every_weight_and_saves_loadable_safetensors(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    trainer, before, changed = train_briefly(tmp_path, tokenizer, "full")
    # every matrix moves; an embedding row moves only if its token was seen, so count matrices
    assert {n for n in before if "layers" in n} <= changed and "lm_head.weight" in changed
    trainer.save_model(str(tmp_path / "model"))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", use_safetensors=True)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), reloaded.get_parameter(name).detach()), name


def test_qlora_keeps_its_frozen_weights_in_the_compute_dtype_as_the_planner_counts(tokenizer):
    """peft's prepare_model_for_kbit_training would upcast embeddings, LM head and norms to fp32 (8B: 4.2 GB
    where bf16 holds 2.1 GB): they stay bf16, and the planner's frozen weights are these bytes. Built in bf16
    on this CPU (building is cheap; only bf16 matmuls are slow here)."""
    import bitsandbytes as bnb

    from train.plan.architecture import nf4_linear_bytes, unquantized_parameters
    from train.plan.memory import frozen_bytes

    overrides = ("method=qlora", "model.gradient_checkpointing=true", "model.dtype=bfloat16")
    config = load_config(composed(*overrides))
    model = build_model(config.model, tokenizer, dtype=torch.bfloat16, seed=0, method=config.method)
    unquantized = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert {p.dtype for p in unquantized} == {torch.bfloat16} and len(unquantized) == 2 + 2 * 2 + 1
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() * p.element_size() for p in unquantized) == 2 * unquantized_parameters(config.model)
    assert frozen_bytes(config.model, config.method) == nf4_linear_bytes(config.model) + 2 * sum(
        p.numel() for p in unquantized
    )
    # the forward runs without autocast (generation at each eval), and gradient checkpointing's reentrant
    # recompute gets an embeddings' output that requires grad
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]])).logits.dtype == torch.bfloat16
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
