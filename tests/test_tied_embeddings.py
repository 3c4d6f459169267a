"""Tied input/output embeddings (Llama 3.2 1B/3B): one tensor under two names, kept one through training under
every method and launch, in checkpoints, in ``model/`` and in the merged export."""

from __future__ import annotations

import pytest
import torch
from conftest import NO_EVAL, run_train
from safetensors import safe_open
from test_config import composed
from test_export import run_export, trained_run
from test_launch import launched, losses

from train.config import load_config
from train.model.build import build_model

TIED = "model.tie_word_embeddings=true"


def saved_keys(directory) -> set[str]:
    keys = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as file:
            keys |= set(file.keys())
    return keys


def assert_tied(model) -> None:
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_merged_export_of_a_tied_model_stays_tied_and_computes_its_logits(tmp_path, tokenizer, method):
    from transformers import AutoModelForCausalLM

    from train.export import adapter_model

    tuned, dataset = trained_run(tmp_path, tokenizer, method, TIED)
    assert_tied(tuned.get_base_model())
    result = run_export(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = saved_keys(tmp_path / "merged")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # as save_pretrained has it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    assert_tied(merged)
    ids = torch.tensor([dataset[0]["input_ids"][:64]])
    unmerged, _ = adapter_model(tmp_path)  # the run's base (dequantized for QLoRA) + its adapter
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        if method == "lora":
            torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.slow
def test_a_tied_full_checkpoint_resumes_step_for_step(tmp_path):
    """The Trainer's checkpoint holds the tied tensor once; resuming re-ties it, so steps 3 and 4 repeat."""
    common = ("method=full", TIED, NO_EVAL, "training.max_steps=4", "training.save_steps=2",
              "training.report_to=[]", "training.logging_steps=1")  # fmt: skip
    first = run_train(f"hydra.run.dir={tmp_path / 'first'}", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint-2"
    embeddings = {key for key in saved_keys(checkpoint) if "embed" in key or "lm_head" in key}
    assert embeddings == {"model.embed_tokens.weight"}
    resumed = run_train(f"hydra.run.dir={tmp_path / 'resumed'}", *common,
                        f"training.resume_from_checkpoint={checkpoint}", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, uninterrupted = losses(tmp_path / "resumed"), losses(tmp_path / "first")
    assert list(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_a_tied_model_trains_alike_under_ddp_fsdp_and_zero3(tmp_path, tokenizer, method):
    """Had a launch untied the LM head from the embedding (FSDP's units, ZeRO-3's partitions, sharded QLoRA's
    loading by name), the two would get different updates and the losses part from step 2 on. Full
    fine-tuning's ``model/`` holds the one tensor under the embedding's name, trained, equal across launches,
    and loads tied in plain transformers. Not LoRA: its tied tensor is frozen, so an untied copy would hold
    the same values and no loss could tell (QLoRA's is the loading by name, which a wrong name breaks)."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for launch in ("ddp", "fsdp", "zero3"):
        (tmp_path / launch).mkdir()
        run_dir, log = launched(tmp_path / launch, launch, f"method={method}", TIED, "training.max_steps=3")
        if method == "qlora" and launch != "ddp":  # read by name at step 0: the embedding, once
            assert "one tensor at a time; each rank keeps its shard (20 tensors)" in log
        runs[launch] = run_dir
    expected = losses(runs["ddp"])
    assert list(expected) == [1, 2, 3]
    for launch in ("fsdp", "zero3"):
        for step, loss in losses(runs[launch]).items():
            assert loss == pytest.approx(expected[step], abs=1e-4), (launch, step)
    if method != "full":
        return
    config = load_config(composed(TIED, "method=full"))
    initial = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)
    reference = None
    for run_dir in runs.values():
        assert "lm_head.weight" not in saved_keys(run_dir / "model")
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model", use_safetensors=True)
        assert_tied(model)
        embedding = model.model.embed_tokens.weight.detach()
        assert not torch.allclose(embedding, initial.model.embed_tokens.weight)  # it trained
        reference = embedding if reference is None else reference
        torch.testing.assert_close(embedding, reference, atol=1e-4, rtol=1e-4)
