"""Reward models (stage=rm, train/run/reward.py): TRL's RewardTrainer on our pairs, full/LoRA/QLoRA, every
launch; what it saves loads in plain transformers (and peft) and scores as the run's evaluation did."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_train
from test_config import composed
from test_launch import SHORT, launched
from test_preference_train import STEADY

from data import encode_preference_records, load_preferences, prepare_from_config
from train.config import ConfigError, load_config
from train.model.build import build_model
from train.run.outputs import read_metrics

REWARD_SAMPLE = REPO / "data" / "samples" / "reward_sample.jsonl"
# 24 steps at batch 2 over the 54 training pairs of data=reward_sample; evaluation on its 14 held-out
# pairs (7 whole prompts) at steps 8, 16 and 24
LEARN = ["+experiment=tiny_rm", *STEADY]  # the README's recipe, logging every step


def test_reward_rows_are_the_whole_sequences_dpo_splits(tokenizer):
    """A pair's chosen_ids/rejected_ids for stage=rm are DPO's prompt_ids + chosen_ids / + rejected_ids,
    cut at max_length the same way."""
    records = load_preferences(REPO / "data" / "samples" / "preference_sample.jsonl", "preference").records[
        :6
    ]
    for max_length in (4096, 96):
        dpo, _ = encode_preference_records(records, tokenizer, objective="dpo", max_length=max_length)
        rm, summary = encode_preference_records(records, tokenizer, objective="rm", max_length=max_length)
        assert rm.column_names == ["chosen_ids", "rejected_ids"]
        assert len(rm) == len(dpo) and "pairs" in str(summary)
        for pair, row in zip(dpo, rm, strict=True):
            assert row["chosen_ids"] == pair["prompt_ids"] + pair["chosen_ids"]
            assert row["rejected_ids"] == pair["prompt_ids"] + pair["rejected_ids"]
            assert max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length


def test_reward_config_checks_before_any_work():
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            load_config(composed("stage=rm", *overrides))
        return str(error.value)

    assert "stage=rm trains on preference pairs" in problems("data=sample")
    assert "training.beta" in problems("+training.beta=0.1")  # DPO's, not RewardConfig's
    config = load_config(
        composed("stage=rm", "data=reward_sample", "+training.center_rewards_coefficient=0.01")
    )
    assert config.stage.name == "rm"
    # QLoRA's sharded loading of a reward model (its new head on every rank): accepted
    sharded = ("method=qlora", "launch=zero3", "launch.num_processes=2")
    assert load_config(composed("stage=rm", "data=reward_sample", *sharded)).method.load_in_4bit


def held_out_pairs(tokenizer, run_dir) -> list[dict]:
    """The run's held-out pairs, as the run prepared them (same cache)."""
    config = load_config(composed(*LEARN))
    _, evaluated, _ = prepare_from_config(
        config.data,
        tokenizer,
        max_length=config.training.max_length,
        objective="rm",
        seed=config.training.seed,
    )
    return list(evaluated)


def ranking(model, pairs) -> tuple[float, float]:
    """The share of pairs whose chosen sequence ``model`` scores above the rejected one, and the mean
    margin r_chosen - r_rejected; each sequence scored alone."""
    with torch.no_grad():
        margins = [
            model(torch.tensor([pair["chosen_ids"]])).logits.item()
            - model(torch.tensor([pair["rejected_ids"]])).logits.item()
            for pair in pairs
        ]
    return sum(margin > 0 for margin in margins) / len(margins), sum(margins) / len(margins)


def evaluations(run_dir) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if "eval_accuracy" in row]


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward")
    runs = {}
    for method, rate in (("full", "1e-3"), ("lora", "5e-3")):
        run_dir = workdir / method
        result = run_train(
            f"hydra.run.dir={run_dir}", *LEARN, f"method={method}", f"training.learning_rate={rate}",
            cwd=workdir, evaluate=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[method] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_reward_model_learns_the_sample_and_loads_in_plain_transformers(reward_runs, method, tokenizer):
    """Trained on 54 pairs, it ranks the 14 held-out ones (prompts it never saw) well above chance, and what
    it saved, loaded by plain transformers (and peft), ranks them exactly as the run's last evaluation
    did; the model it started from had next to no preference (its new head is drawn at std 0.02)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir = reward_runs[method]
    evaluated = evaluations(run_dir)
    assert [row["step"] for row in evaluated] == [8, 16, 24]
    last = evaluated[-1]
    assert last["eval_accuracy"] >= 0.75 and last["eval_margin"] > 1, evaluated  # chance: P(>= 11 of 14) 2.9%
    assert {"accuracy", "margin", "loss"} <= next(r for r in read_metrics(run_dir / "metrics.jsonl")).keys()
    pairs = held_out_pairs(tokenizer, run_dir)
    assert len(pairs) == 14
    config = load_config(composed(*LEARN, f"method={method}"))
    start = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed, reward=True)
    if method == "full":
        saved = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", use_safetensors=True)
    else:
        adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
        saved = PeftModel.from_pretrained(start, run_dir / "adapter")
        start = build_model(
            config.model, tokenizer, dtype=torch.float32, seed=config.training.seed, reward=True
        )
    assert saved.config.pad_token_id == tokenizer.pad_token_id
    accuracy, margin = ranking(saved.eval(), pairs)
    assert accuracy == pytest.approx(last["eval_accuracy"]) and margin == pytest.approx(last["eval_margin"])
    _, margin_at_start = ranking(start.eval(), pairs)
    assert abs(margin_at_start) < margin / 5, (margin_at_start, margin)


@pytest.mark.slow
def test_a_qlora_reward_model_trains_its_head_and_adapter_in_fp32_alike_on_every_launch(tmp_path):
    """QLoRA: the head and the adapter train and are saved in fp32. Under FSDP and ZeRO-3 no rank quantizes
    the whole model (the sharded loader of train/model/quantized_loading.py reads the base at step 0) and
    the new head, which the base checkpoint lacks, is written on every rank before peft copies it: 2
    processes at batch 1 give one process's losses and accuracies at batch 2, step for step."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "qlora"
    result = run_train(
        f"hydra.run.dir={run_dir}", "stage=rm", "data=reward_sample", "method=qlora", *SHORT,
        "training.max_steps=3", "training.per_device_train_batch_size=2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    heads = [name for name in saved if "score" in name]
    assert heads and all(t.dtype == torch.float32 for t in saved.values()), (heads, saved.keys())
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    single = [(row["loss"], row["accuracy"]) for row in rows]
    assert len(single) == 3 and single[0][0] == pytest.approx(0.6931, abs=0.2)
    for launch in ("fsdp", "zero3"):
        (tmp_path / launch).mkdir()
        sharded_dir, log = launched(
            tmp_path / launch, launch, "stage=rm", "data=reward_sample", "method=qlora",
            "training.max_steps=3",
        )  # fmt: skip
        assert "read and quantized by rank 0, one tensor at a time" in log, launch
        if launch == "zero3":  # bnb_4bit_quant_storage in the compute dtype: ZeRO-3 partitions Params4bit too
            assert "38/38 parameters partitioned (24 Parameter, 14 Params4bit), rank 0 holds 50%" in log
        rows = [row for row in read_metrics(sharded_dir / "metrics.jsonl") if "loss" in row]
        for (loss, accuracy), (expected_loss, expected_accuracy) in zip(
            [(row["loss"], row["accuracy"]) for row in rows], single, strict=True
        ):
            assert loss == pytest.approx(expected_loss, abs=1e-4) and accuracy == expected_accuracy, launch
        adapter = load_file(sharded_dir / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == saved.keys(), launch
        for name, tensor in adapter.items():
            torch.testing.assert_close(tensor, saved[name], atol=1e-4, rtol=1e-3, msg=f"{launch}: {name}")


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """A full and a LoRA SFT run of 2 steps, to start reward models from."""
    workdir = tmp_path_factory.mktemp("sft")
    runs = {}
    for method in ("full", "lora"):
        runs[method] = workdir / f"sft-{method}"
        result = run_train(
            f"hydra.run.dir={runs[method]}", f"method={method}", *STEADY, "training.max_steps=2", cwd=workdir
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


@pytest.mark.slow
def test_a_reward_model_trains_alike_under_ddp_fsdp_and_zero3(tmp_path, sft_runs):
    """From a full SFT run's model/ (read once per node: FSDP's rank 0 broadcasts it, ZeRO-3 partitions it
    while read under zero.Init), 2 processes at batch 1 each: the same losses and accuracies step for step
    on every launch."""
    logged = {}
    for launch in ("ddp", "fsdp", "zero3"):
        (tmp_path / launch).mkdir()
        run_dir, log = launched(
            tmp_path / launch, launch, "stage=rm", "data=reward_sample", "method=lora",
            "training.max_steps=3", f"stage.init_from={sft_runs['full']}",
        )  # fmt: skip
        if launch == "zero3":
            assert "weights partitioned while read (DeepSpeed ZeRO-3 zero.Init)" in log
        rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
        logged[launch] = [(row["loss"], row["accuracy"]) for row in rows]
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(logged["ddp"]) == 3
    for launch in ("fsdp", "zero3"):
        for (loss, accuracy), (expected_loss, expected_accuracy) in zip(
            logged[launch], logged["ddp"], strict=True
        ):
            assert loss == pytest.approx(expected_loss, abs=1e-4) and accuracy == expected_accuracy, launch


@pytest.mark.slow
def test_a_reward_model_starts_from_an_sft_run_on_every_kind_of_run(sft_runs, tokenizer, tmp_path):
    """From a full SFT run its decoder is the run's model/ (under every launch:
    test_a_reward_model_trains_alike_under_ddp_fsdp_and_zero3); from a LoRA SFT run the adapter merged into
    its base; either way under a new head. QLoRA from an adapter run is refused before any work, saying what
    to do instead."""
    from safetensors.torch import load_file

    from train.export import merged_model
    from train.run.preference import fresh_start

    sft = sft_runs
    expected = {
        "full": load_file(sft["full"] / "model" / "model.safetensors")["model.norm.weight"],
        "lora": merged_model(sft["lora"])[0].model.layers[0].self_attn.q_proj.weight,
    }
    for method, start in sft.items():
        config = load_config(composed("stage=rm", "data=reward_sample", f"stage.init_from={start}"))
        model = fresh_start(config, tokenizer, torch.float32, reward=True)
        got = model.model.norm.weight if method == "full" else model.model.layers[0].self_attn.q_proj.weight
        torch.testing.assert_close(got, expected[method].float())
        assert model.score.weight.shape == (1, config.model.hidden_size)
    with pytest.raises(ConfigError, match=r"method=qlora: .*\(python -m train.export run="):
        load_config(
            composed("stage=rm", "data=reward_sample", f"stage.init_from={sft['lora']}", "method=qlora")
        )
    # the merged adapter under a new head under ZeRO-3, where building the head's model partitioned it
    # before it was initialized (IndexError on the embedding's padding row) until new_reward_model
    (tmp_path / "zero3").mkdir()
    run_dir, log = launched(
        tmp_path / "zero3", "zero3", "stage=rm", "data=reward_sample", "method=lora", "training.max_steps=2",
        f"stage.init_from={sft['lora']}",
    )  # fmt: skip
    assert "model DeepSpeedEngine, ZeRO-3" in log
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_planner_counts_a_reward_model_without_reference_or_lm_head_and_both_sequences_of_a_pair():
    from train.plan import format_plan, plan_memory, reference_model
    from train.plan.memory import step_tokens

    config = load_config(composed("stage=rm", "data=reward_sample", "model=8b", "method=qlora"), check=False)
    assert reference_model(config) == "none"
    assert step_tokens(512, 2, "rm") == step_tokens(512, 2, "dpo") == 2 * step_tokens(512, 2, "sft")
    plan = plan_memory(
        config.model, config.method, config.launch, seq_len=1024, batch=1, stage="rm", reference="none"
    )
    sft = plan_memory(config.model, config.method, config.launch, seq_len=1024, batch=1)
    assert plan.per_gpu_bytes["reference"] == 0 and "reference model" not in format_plan(plan)
    assert (
        plan.activations_bytes["without_checkpointing"] == 2 * sft.activations_bytes["without_checkpointing"]
    )
    # no LM head: 8B's 128,256 x 4,096 fewer weights (the one-row score head aside), and no logits
    assert sft.params - plan.params == 128_256 * 4_096 and plan.params == 7_504_924_672
    assert plan.logits_unfused_bytes == 0 and plan.per_gpu_bytes["lm_head_loss"] == 2 * 1024 * 4_096 * 4
    assert plan.per_gpu_bytes["weights"] == sft.per_gpu_bytes["weights"] - 128_256 * 4_096 * 2  # bf16 head


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_reward_model_run_scores_grpo_completions_as_the_model_does(reward_runs, method, tokenizer):
    """train.run.rewards.RewardModel (stage.rewards: {_target_: ...RewardModel, run: <rm run>}) gives each
    prompt + completion the reward model's score of that chat, as the run's own model scores its rows."""
    from data import encode_chat
    from train.run.rewards import RewardModel

    records = [json.loads(line) for line in REWARD_SAMPLE.read_text().splitlines()[:4]]
    prompts = [record["prompt"] for record in records]
    completions = [record[side] for record in records for side in ("chosen",)]
    scorer = RewardModel(str(reward_runs[method]), batch_size=3)  # a padded batch and a batch of one
    scores = scorer(prompts=prompts, completions=completions)
    model = scorer.model
    with torch.no_grad():
        alone = [
            model(torch.tensor([encode_chat([*p, *c], tokenizer)["input_ids"]])).logits.item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert scores == pytest.approx(alone, abs=1e-4)
    assert scorer.__name__ == f"reward_model({method})"
