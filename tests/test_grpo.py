"""Online RL (stage=grpo, train/run/grpo.py): TRL's GRPOTrainer on our prompts with the reward functions the
config names; it learns a reward from a random start, runs on every launch with completions of uneven
length, keeps the reference as the method says, and refuses what cannot run before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_train
from test_config import composed
from test_launch import launched

from data import DataError, prepare_from_config
from data.prompts import load_prompts, prompt_ids  # our encoder, up to the assistant header
from train.config import ConfigError, load_config
from train.run import rewards
from train.run.outputs import read_metrics

SAMPLES = REPO / "data" / "samples"
# the learning run: a whole group (8 completions of one prompt) per step, a constant large step
LEARN = [
    "stage=grpo", "data=arithmetic_sample", "method=full", "training.per_device_train_batch_size=8",
    "stage.num_generations=8", "stage.max_completion_length=8", "training.learning_rate=1e-2",
    "training.warmup_steps=0", "training.lr_scheduler_type=constant", "training.logging_steps=1",
    "training.report_to=[]",
]  # fmt: skip


# ── the shipped reward functions ──────────────────────────────────────────────────────────────
def test_shipped_rewards_score_what_they_say(tokenizer):
    from data.tokenizer import stop_token_ids

    assert set(stop_token_ids(tokenizer)) == rewards._STOP_IDS
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert rewards.ends_at_eot([[5, 6, eot], [5, 6, 7], []]) == [1.0, 0.0, 0.0]
    assert rewards.length_within([[1] * 3 + [eot], [1] * 5, [eot]], min_tokens=1, max_tokens=4) == [
        1.0,
        0.0,
        0.0,
    ]
    chat = [[{"role": "assistant", "content": "It is 12, then 42."}], "The answer: 7.0", "no number", "-3"]
    assert rewards.exact_answer(chat, answer=["42", "7", "1", None]) == [1.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="no 'answer' column; give each record"):
        rewards.exact_answer(["1"])
    assert rewards.digit_share(["12 3", "a1", "", "ab"]) == [1.0, 0.5, 0.0, 0.0]
    assert rewards.latin_share(["abc", "абв", "aб", "123"]) == [1.0, 0.0, 0.5, 0.0]


# ── prompts ───────────────────────────────────────────────────────────────────────────────────
def test_prompts_come_from_a_prompt_file_with_their_columns_or_from_any_chat_source(tmp_path, tokenizer):
    dataset, summary = load_prompts(SAMPLES / "arithmetic_sample.jsonl", "prompts")
    assert len(dataset) == 200 and dataset.column_names == ["prompt", "answer"]
    assert dataset[0]["prompt"] == [
        {"role": "user", "content": "What is 97 - 53? Answer with the number only."}
    ]
    assert dataset[0]["answer"] == "44" and "columns for the rewards: answer" in str(summary)

    for prompt in dataset["prompt"]:  # as TRL renders each (apply_chat_template, generation prompt)
        rendered = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert rendered["input_ids"] == prompt_ids(prompt, tokenizer)
    chats, _ = load_prompts(SAMPLES / "sharegpt_sample.jsonl", "sharegpt")
    first = json.loads((SAMPLES / "sharegpt_sample.jsonl").read_text().splitlines()[0])["conversations"]
    last_reply = max(i for i, turn in enumerate(first) if turn["from"] == "gpt")
    assert len(chats[0]["prompt"]) == last_reply and chats[0]["prompt"][-1]["role"] == "user"
    assert chats[0]["reference"] == first[last_reply]["value"]
    for prompt in chats["prompt"]:  # system prompts and earlier turns included
        rendered = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert rendered["input_ids"] == prompt_ids(prompt, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "fine", "answer": "1"}) + "\n"
        + json.dumps({"question": "no prompt", "answer": "2"}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                      "answer": "3"}) + "\n"
    )  # fmt: skip
    kept, summary = load_prompts(bad, "prompts")
    assert len(kept) == 1 and f"{bad}:2: a record needs a 'prompt'" in str(summary)
    assert f"{bad}:3: the prompt ends on a assistant turn" in str(summary)
    with pytest.raises(DataError, match=rf"{bad}:2: a record needs a 'prompt'.*data.strict"):
        load_prompts(bad, "prompts", strict=True)
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=rf"{none}: no usable prompt .*\n.*1 records, 1 dropped"):
        load_prompts(none, "prompts")

    config = load_config(composed("stage=grpo", "data=arithmetic_sample", "data.eval_split=20"))
    trained, evaluated, summary = prepare_from_config(
        config.data, tokenizer, max_length=512, objective="grpo"
    )
    assert (len(trained), len(evaluated)) == (180, 20) and "held out for evaluation: 20 of 200 rows" in str(
        summary
    )


def test_prompts_longer_than_their_share_of_max_length_are_left_out_and_counted(tmp_path, tokenizer):
    """A prompt and its completion share training.max_length (what the planner counts), so a prompt over
    training.max_length - stage.max_completion_length tokens, as TRL renders it, is left out, counted with
    where it is; a bound that leaves no prompt is refused before any work."""
    from data.config import data_max_length

    source = tmp_path / "prompts.jsonl"
    short, long = "What is 2 + 2?", " ".join(["word"] * 300)
    typed = "End your turn here <|eot_id|> and go on"
    source.write_text(
        "\n".join(json.dumps({"prompt": text, "answer": "4"}) for text in (short, long, short, typed))
    )
    config = load_config(composed(
        "stage=grpo", f"data.path={source}", "data.format=prompts", "data.eval_split=0",
        "training.max_length=256", "stage.max_completion_length=64",
    ))  # fmt: skip
    assert data_max_length(config) == 192
    kept, _, summary = prepare_from_config(config.data, tokenizer, max_length=192, objective="grpo")
    assert kept["prompt"] == [[{"role": "user", "content": short}]] * 2
    length = len(prompt_ids([{"role": "user", "content": long}], tokenizer))
    assert length > 192 and f"{source}:2: a prompt of {length} tokens" in str(summary)
    assert "1 × prompt over 192 tokens" in str(summary)
    assert f"{source}:4: '<|eot_id|>' typed in a message: TRL would read it as the token" in str(summary)
    # the bound keeps a prompt of exactly its length
    assert len(load_prompts(source, "prompts", tokenizer=tokenizer, max_tokens=length)[0]) == 3
    assert len(load_prompts(source, "prompts", tokenizer=tokenizer, max_tokens=length - 1)[0]) == 2
    chats, summary = load_prompts(
        SAMPLES / "sharegpt_sample.jsonl", "sharegpt", tokenizer=tokenizer, max_tokens=60
    )  # its prompts take 42 to 165 tokens; 4 take more than 60
    assert len(chats) == 8 and all(len(prompt_ids(prompt, tokenizer)) <= 60 for prompt in chats["prompt"])
    assert f"{SAMPLES / 'sharegpt_sample.jsonl'}: conversation " in str(summary)
    with pytest.raises(
        ConfigError, match="stage.max_completion_length=256: a prompt and its completion share"
    ):
        load_config(composed("stage=grpo", "data=arithmetic_sample", "training.max_length=256",
                             "stage.max_completion_length=256"))  # fmt: skip


def test_grpo_settings_are_checked_before_any_work(tmp_path):
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            load_config(composed("stage=grpo", "data=arithmetic_sample", *overrides))
        return str(error.value)

    assert "stage.rewards: name at least one reward function" in problems("stage.rewards=[]")
    assert "stage.rewards[0]._target_: train.run.rewards.nothing does not import" in problems(
        "stage.rewards=[{_target_: train.run.rewards.nothing}]"
    )
    assert "stage.rewards[0].weight: 'heavy' is not a number" in problems(
        "stage.rewards=[{_target_: train.run.rewards.ends_at_eot, weight: heavy}]"
    )
    assert "stage.num_generations=1: GRPO compares completions of the same prompt" in problems(
        "stage.num_generations=1"
    )
    assert "stage.use_vllm: vllm is not installed" in problems("stage.use_vllm=true")
    assert "stage=grpo trains on prompts" in problems("data=preference_sample")
    assert "stage.beta: required for grpo" in problems("stage.beta=null")
    from train.run.trainer import training_args

    # the default batch (2) holds half a group of 4: TRL generates one group, then takes 2 steps on it
    args = training_args(load_config(composed("stage=grpo", "data=sample")), tmp_path, torch.float32)
    assert (args.num_generations, args.generation_batch_size, args.steps_per_generation) == (4, 4, 2)
    assert args.reward_weights is None and args.beta == 0.04 and not hasattr(args, "max_length")
    from train.run.grpo import reward_functions

    two = (
        "stage.rewards=[{_target_: train.run.rewards.length_within, max_tokens: 2, weight: 0.5}, "
        "{_target_: train.run.rewards.ends_at_eot}]"
    )
    functions, weights = reward_functions(load_config(composed("stage=grpo", "data=sample", two)))
    assert [f.__name__ for f in functions] == ["length_within", "ends_at_eot"] and weights == [0.5, 1.0]
    assert functions[0](completion_ids=[[1, 2], [1, 2, 3]]) == [1.0, 0.0]  # max_tokens=2 bound


# ── training ──────────────────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_grpo_learns_a_verifiable_reward_from_a_random_start(tmp_path):
    """digit_share (the reply to "Answer with the number only" is digits) on the random tiny model: its
    samples hold a digit now and then; within 32 steps the mean reward goes from ~0.01 to ~1. Each logged
    step's completions are in samples.jsonl with their rewards."""
    run_dir = tmp_path / "grpo"
    result = run_train(
        f"hydra.run.dir={run_dir}", "+experiment=tiny_grpo", "training.report_to=[]", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    means = [row["reward"] for row in read_metrics(run_dir / "metrics.jsonl") if "reward" in row]
    assert len(means) == 32
    first, last = sum(means[:8]) / 8, sum(means[-4:]) / 4
    assert first < 0.05 and last > 0.8, means
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 * 8 and samples[-1]["step"] == 32
    assert samples[-1]["prompt"].startswith("What is ") and set(samples[-1]["rewards"]) == {"digit_share"}
    late = [row["rewards"]["digit_share"] for row in samples if row["step"] == 32]
    assert sum(late) / len(late) == pytest.approx(means[-1], abs=1e-6)
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "lora from an sft adapter"])
def test_the_kl_reference_follows_the_method(tmp_path, tokenizer, method):
    """Full fine-tuning scores the KL against a frozen copy of its starting weights (made from the policy:
    TRL would reload a path the random model does not have); LoRA/QLoRA against the adapter disabled, no
    copy. Two steps: the KL is 0 at step 1 (policy == reference) and positive after the first update.
    ``stage.init_from`` a LoRA SFT run: the policy starts from that adapter merged into its base (so does
    the reference, the new adapter disabled)."""
    from train.export import merged_model
    from train.model.build import build_model, compute_dtype
    from train.run.grpo import build_grpo_trainer
    from train.run.outputs import save_resolved_config
    from train.run.preference import fresh_start
    from train.run.trainer import training_args

    varied = "stage.rewards=[{_target_: train.run.rewards.latin_share}]"  # differs between completions
    start_from = []
    if method == "lora from an sft adapter":
        method, sft = "lora", tmp_path / "sft"
        result = run_train(
            f"hydra.run.dir={sft}", "method=lora", "training.max_steps=2", "training.report_to=[]",
            "training.learning_rate=1e-2", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        start_from = [f"stage.init_from={sft}"]
    cfg = composed(
        *LEARN, f"method={method}", "training.max_steps=2", "stage.max_completion_length=4", varied,
        *start_from,
    )  # fmt: skip
    cfg.output_dir = str(tmp_path)
    config = load_config(cfg)
    save_resolved_config(cfg, tmp_path)
    dataset, _, _ = prepare_from_config(config.data, tokenizer, max_length=512, objective="grpo")
    dtype = compute_dtype(config.model.dtype)
    model = fresh_start(config, tokenizer, dtype)  # the base (model.*), or the run stage.init_from names
    start = {name: t.detach().clone() for name, t in model.named_parameters() if "layers.0." in name}
    if start_from:  # the SFT adapter merged: its trained q_proj, not the base's
        merged = merged_model(sft)[0].model.layers[0].self_attn.q_proj.weight
        torch.testing.assert_close(start["model.layers.0.self_attn.q_proj.weight"], merged)
        base = build_model(config.model, tokenizer, dtype=dtype, seed=config.training.seed)
        assert not torch.allclose(base.model.layers[0].self_attn.q_proj.weight, merged)  # the SFT moved it
    trainer = build_grpo_trainer(
        config, model, tokenizer, dataset, tmp_path, training_args(config, tmp_path, dtype)
    )
    if method == "full":
        reference = dict(trainer.ref_model.named_parameters())
        assert all(torch.equal(reference[name], value) for name, value in start.items())
        assert not any(parameter.requires_grad for parameter in trainer.ref_model.parameters())
    else:
        assert trainer.ref_model is None  # TRL scores the reference with the adapter disabled
    trainer.train()
    kl = [row["kl"] for row in read_metrics(tmp_path / "metrics.jsonl") if "kl" in row]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0, kl


@pytest.mark.slow
def test_grpo_generates_and_trains_alike_under_ddp_fsdp_and_zero3_with_uneven_completions(tmp_path):
    """2 processes, one group each step; 4,000 stop tokens (3% of the vocabulary) end completions at random
    lengths, so the ranks finish generating at different steps (a rank that stops stepping while the other
    still needs the sharded weights would hang FSDP and ZeRO-3). TRL pads each rank's completions to its
    longest and counts what follows a stop it does not know as completion, so the gathered lengths differ
    exactly where the ranks stopped at different steps. The same rewards, lengths and losses step for step."""
    stops = ",".join(str(token) for token in range(1000, 5000))  # Hydra parses 1,000 a second: no more
    logged = {}
    for launch in ("ddp", "fsdp", "zero3"):
        (tmp_path / launch).mkdir()
        run_dir, _ = launched(
            tmp_path / launch, launch, "stage=grpo", "data=arithmetic_sample", "training.max_steps=2",
            "training.per_device_train_batch_size=2", "stage.num_generations=4",
            "stage.max_completion_length=64",
            f"+training.generation_kwargs={{eos_token_id:[{stops}]}}",
            "stage.rewards=[{_target_: train.run.rewards.length_within, weight: 1.0, max_tokens: 12}]",
        )  # fmt: skip
        rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "reward" in row]
        logged[launch] = [
            (row["reward"], row["completions/mean_length"], row["completions/min_length"], row["loss"])
            for row in rows
        ]
    assert len(logged["ddp"]) == 2
    assert any(row[2] < row[1] < 64 for row in logged["ddp"]), logged["ddp"]  # (min < mean < 64)
    for launch in ("fsdp", "zero3"):
        for got, expected in zip(logged[launch], logged["ddp"], strict=True):
            assert got == pytest.approx(expected, abs=1e-4), launch


def test_the_planner_counts_generation_and_the_reference_grpo_keeps():
    from train.plan import reference_model
    from train.plan.architecture import kv_cache_bytes_per_token
    from train.plan.fit import planned_generation
    from train.plan.memory import Generation
    from train.plan.run import plan_memory

    def config(*overrides: str):
        return load_config(composed("stage=grpo", "data=arithmetic_sample", *overrides), check=False)

    assert [reference_model(config(f"method={m}")) for m in ("lora", "qlora", "full")] == [
        "base",
        "base",
        "weights",
    ]
    assert reference_model(config("stage.beta=0")) == "none"
    # the default batch of 2 on 1 process holds half a group of 4: one group (4 sequences) generated at once
    assert planned_generation(config()) == Generation(sequences=4, tokens=512)
    assert planned_generation(config("launch=ddp", "launch.num_processes=8", "stage.num_generations=16")) == (
        Generation(sequences=2, tokens=512)
    )
    big = config("model=8b", "method=qlora", "training.max_length=2048", "stage.num_generations=16")
    generation = Generation(sequences=16, tokens=2048)
    plain = plan_memory(
        big.model, big.method, big.launch, seq_len=2048, batch=2, stage="grpo", reference="base"
    )
    with_generation = plan_memory(
        big.model, big.method, big.launch, seq_len=2048, batch=2, stage="grpo", reference="base",
        generation=generation,
    )  # fmt: skip
    kv = 16 * 2048 * kv_cache_bytes_per_token(big.model)  # bf16 on the GPUs the launch names
    assert with_generation.per_gpu_bytes["generation"] == kv + 2 * 16 * big.model.vocab_size * 4
    assert kv == 4 * 2**30  # 8B: 128 KiB a token, 32,768 tokens
    assert with_generation.peak_bytes_per_gpu > plain.peak_bytes_per_gpu  # 4 GiB of cache over the step's
    assert with_generation.recommended.peak_bytes_per_gpu == with_generation.peak_bytes_per_gpu  # 1 GPU
    zero3 = config("model=8b", "method=full", "launch=zero3", "launch.num_processes=8")
    sharded = plan_memory(
        zero3.model, zero3.method, zero3.launch, seq_len=512, batch=1, stage="grpo", reference="weights",
        generation=Generation(sequences=1, tokens=512),
    )  # fmt: skip
    # TRL gathers the whole model on every rank to generate: the 7 shards this rank does not hold
    whole = 8 * sharded.per_gpu_bytes["weights"]
    assert sharded.per_gpu_bytes["generation"] >= whole * 7 // 8 - 8


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rm", "grpo"])
def test_a_stopped_run_resumes_with_the_rewards_and_losses_it_would_have_had(tmp_path, stage):
    """A stop request (the stop file: what SIGTERM, USR1 and the Slurm job's traps go through) before the
    first step: the run checkpoints after step 1 and stops; the same command with resume latest goes on,
    and steps 2-4 log what the run never stopped logs: GRPO's sampled completions (every rank's RNG comes
    back from the checkpoint), their rewards and the losses; a reward model's losses and accuracies."""
    from train.run.run_dir import STOP_FILE, STOPPED_FILE

    if stage == "grpo":
        settings = [
            *LEARN,
            "training.max_steps=4",
            "stage.max_completion_length=6",
            "stage.num_generations=4",
            "training.per_device_train_batch_size=4",
            "stage.rewards=[{_target_: train.run.rewards.latin_share}]",
        ]
        keys = ("loss", "reward", "kl", "completions/mean_length")
    else:
        settings = [
            "stage=rm",
            "data=reward_sample",
            "training.max_steps=4",
            "training.logging_steps=1",
            "training.report_to=[]",
            "training.max_length=256",
        ]
        keys = ("loss", "accuracy", "margin")
    held_out = ["data.eval_split=4", "training.eval_steps=2"] if stage == "grpo" else ["data.eval_split=0"]
    settings += ["training.save_steps=100", *held_out]

    def logged(run_dir):
        rows = read_metrics(run_dir / "metrics.jsonl")
        steps = {row["step"]: tuple(row[key] for key in keys) for row in rows if "loss" in row}
        evaluated = {row["step"]: row["eval_reward"] for row in rows if "eval_reward" in row}
        return steps, evaluated

    whole = tmp_path / "whole"
    assert run_train(f"hydra.run.dir={whole}", *settings, cwd=tmp_path).returncode == 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / STOP_FILE).touch()
    first = run_train(f"hydra.run.dir={stopped}", *settings, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (stopped / STOPPED_FILE).read_text().startswith("1 ")
    resumed = run_train(
        f"hydra.run.dir={stopped}", *settings, "training.resume_from_checkpoint=latest", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (expected, expected_eval), (got, got_eval) = logged(whole), logged(stopped)
    assert list(expected) == [1, 2, 3, 4] and list(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got[step], expected[step])
    if stage == "grpo":  # held-out prompts: completions sampled and scored at steps 2 and 4
        assert list(expected_eval) == [2, 4] and got_eval == pytest.approx(expected_eval, abs=1e-6)


def test_a_grpo_search_maximizes_the_held_out_reward():
    """Optuna minimizes what a run returns: minus GRPO's last held-out mean reward (its loss says nothing of
    the policy), the last eval loss otherwise."""
    from train.run.sweep import objective

    history = [
        {"eval_loss": 0.1, "eval_reward": 0.25},
        {"loss": 0.0},
        {"eval_loss": 0.0, "eval_reward": 0.75},
    ]
    assert objective(history, "grpo") == -0.75 and objective(history, "rm") == 0.0
    assert objective([{"loss": 1.0}], "grpo") is None
