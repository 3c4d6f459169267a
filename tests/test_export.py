"""Merge and export: the merged checkpoint computes what base + adapter computed, in plain transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_trainer import tiny_trainer

from train.export import adapter_model
from train.outputs import final_dir


def trained_run(tmp_path, tokenizer, method: str):
    """A finished tiny run directory: config.yaml and the adapter, as python -m train leaves them."""
    trainer, dataset = tiny_trainer(
        tmp_path, tokenizer, f"method={method}", "training.max_steps=3", "training.save_steps=100"
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


@pytest.mark.parametrize("method", ["lora", "qlora"])
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
