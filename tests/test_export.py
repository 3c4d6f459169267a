"""Merge and export: the merged checkpoint computes what base + adapter computed, in plain transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, meta_base_checkpoint
from test_config import composed
from test_trainer import tiny_trainer

from data import load_tokenizer
from train.config import load_config
from train.export import adapter_model, export
from train.model.build import build_model
from train.run.outputs import final_dir


def trained_run(tmp_path, tokenizer, method: str, *overrides: str):
    """A finished tiny run directory: config.yaml and the adapter, as python -m train leaves them."""
    trainer, dataset = tiny_trainer(
        tmp_path, tokenizer, f"method={method}", "training.max_steps=3", "training.save_steps=100", *overrides
    )
    trainer.train()
    trainer.save_model(str(final_dir(tmp_path, method)))
    return trainer.model.eval(), dataset


def run_export(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.export", f"run={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


# qlora slow: the inner loop keeps lora's merge (CI runs both)
@pytest.mark.parametrize("method", ["lora", pytest.param("qlora", marks=pytest.mark.slow)])
def test_merged_checkpoint_matches_the_adapter(tmp_path, tokenizer, method):
    from transformers import AutoModelForCausalLM

    tuned, dataset = trained_run(tmp_path, tokenizer, method)
    result = run_export(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    assert not hasattr(merged, "peft_config") and getattr(merged, "hf_quantizer", None) is None

    ids = torch.tensor([dataset[0]["input_ids"][:64]])
    with torch.no_grad():
        expected, got = tuned(input_ids=ids).logits, merged(input_ids=ids).logits
    generated = merged.generate(ids[:, :16], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 21)
    if method == "lora":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            assert torch.equal(
                generated, tuned.generate(input_ids=ids[:, :16], max_new_tokens=5, do_sample=False)
            )
    else:
        # The merge itself is exact: merged == dequantized base + adapter, unmerged.
        unmerged, _ = adapter_model(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(got, unmerged.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        # Against the trained 4-bit model: on CPU bitsandbytes' 4-bit matmul dequantizes to bf16, so
        # training computed its base in bf16 and the merged fp32 model differs by that rounding only.
        assert (got - expected).abs().mean() / expected.abs().mean() < 0.03
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_export_refuses_what_it_cannot_merge(tmp_path):
    result = run_export(tmp_path)
    assert result.returncode == 2 and f"{tmp_path}/config.yaml: no such file" in result.stderr


def test_merge_runs_on_the_cpu_where_a_gpu_is_visible(tmp_path, tokenizer, monkeypatch):
    """What this proves here, on a machine without a GPU: with torch reporting a bf16-capable GPU, export
    still loads the QLoRA base in 4-bit, dequantizes and merges it on the CPU, in bf16 as a GPU run computes,
    and writes it shard by shard. This torch has no CUDA, so any ``.cuda()``, ``.to("cuda")`` or GPU
    ``device_map`` on the way would raise. What it cannot prove: bitsandbytes' CUDA build on a real GPU."""
    import json

    from transformers import AutoModelForCausalLM

    trained_run(tmp_path, tokenizer, "qlora", "training.max_shard_size=1MB")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    unmerged, _ = adapter_model(tmp_path)
    assert {p.device.type for p in unmerged.parameters()} == {"cpu"}
    assert unmerged.get_base_model().lm_head.weight.dtype == torch.bfloat16

    out = export(tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # 1 MB files: the 65 MB vocabulary matrices alone each
    monkeypatch.undo()
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert merged.config.dtype == torch.bfloat16 and merged.lm_head.weight.dtype == torch.bfloat16
    assert not hasattr(merged, "peft_config") and getattr(merged, "hf_quantizer", None) is None


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_a_base_checkpoint_tuned_in_the_instruct_format_stops_at_eot(tmp_path, tokenizer, method):
    """A base checkpoint (tokenizer EOS <|end_of_text|>, generation_config eos 128001) fine-tuned in the
    Instruct format: what the run saves and what export writes load, in plain transformers, stopping at
    <|eom_id|> and <|eot_id|> too, as Meta's Instruct release does."""
    from transformers import AutoTokenizer, GenerationConfig

    architecture = load_config(composed()).model
    random_weights = build_model(architecture, tokenizer, dtype=torch.float32, seed=0)
    base = meta_base_checkpoint(tmp_path / "Llama-3.1-base", tokenizer, random_weights)
    assert GenerationConfig.from_pretrained(base).eos_token_id == 128001
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer, _ = tiny_trainer(
        run_dir, load_tokenizer(base), f"method={method}", f"model.path={base}", "training.max_steps=2",
        "training.save_steps=100",
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(final_dir(run_dir, method)))
    saved = [final_dir(run_dir, method), *([export(run_dir)] if method == "lora" else [])]
    for directory in saved:
        assert AutoTokenizer.from_pretrained(directory).eos_token == "<|eot_id|>", directory
        assert GenerationConfig.from_pretrained(directory).eos_token_id == [128001, 128008, 128009], directory
