"""Preference training (train/run/preference.py): DPO and KTO with TRL's trainers on our prepared rows, the
reference model, the CPU LM head, resume, starting from an SFT run, and what fails before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, run_train
from omegaconf import OmegaConf
from test_config import composed
from trl import DPOTrainer

from data import encode_preference_records, load_preferences
from train.config import ConfigError, load_config
from train.model.build import build_model, compute_dtype
from train.plan import REFERENCES, format_plan, plan_memory, reference_model
from train.run.outputs import read_metrics, save_resolved_config
from train.run.preference import build_preference_trainer, init_model, kl_partners, score_with_model_logits
from train.run.trainer import training_args

SAMPLES = REPO / "data" / "samples"
# Steps of a run that moves visibly: a constant, large learning rate on a batch that is the whole data.
STEADY = [
    "training.report_to=[]",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
    "training.max_length=256",
]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sample_records(name: str, count: int) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines()[:count]]


def logged(run_dir, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if key in row and "loss" in row]


# ── in process: the trainer a run builds ──────────────────────────────────────────────────────
def preference_trainer(tmp_path, tokenizer, *overrides: str, rows: int = 4):
    """The trainer ``python -m train stage=dpo ...`` builds, on the first ``rows`` shipped records."""
    cfg = composed("stage=dpo", "data=preference_sample", "training.report_to=[]", *overrides)
    cfg.output_dir = str(tmp_path)
    config = load_config(cfg)
    save_resolved_config(cfg, tmp_path)
    records = load_preferences(config.data.path, config.data.format).records[:rows]
    dataset, _ = encode_preference_records(
        records, tokenizer, objective=config.stage.name, max_length=config.training.max_length
    )
    dtype = compute_dtype(config.model.dtype)
    if config.stage.init_from:
        model = init_model(config, tokenizer, dtype)
    else:
        model = build_model(
            config.model, tokenizer, dtype=dtype, seed=config.training.seed, method=config.method
        )
    args = training_args(config, tmp_path, dtype)
    return build_preference_trainer(config, model, tokenizer, dataset, tmp_path, args), dataset


def test_stage_settings_reach_trl_under_their_names(tmp_path, tokenizer):
    trainer, dataset = preference_trainer(tmp_path, tokenizer, "stage.beta=0.25", "training.max_length=300")
    assert isinstance(trainer, DPOTrainer)
    assert (trainer.args.beta, trainer.args.loss_type, trainer.args.max_length) == (0.25, ["sigmoid"], 300)
    assert trainer.ref_model is None  # LoRA: the reference is the base with the adapter disabled
    assert trainer.train_dataset.to_list() == dataset.to_list()  # our rows, not re-tokenized
    if not torch.cuda.is_available():
        assert not trainer.args.bf16 and trainer.args.use_cpu
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    kto_dir = tmp_path / "kto"
    kto_dir.mkdir()
    kto, _ = preference_trainer(
        kto_dir, tokenizer, "stage=kto", "data=kto_sample", "stage.undesirable_weight=1.5"
    )
    assert (kto.args.beta, kto.args.loss_type, kto.args.undesirable_weight) == (0.1, "kto", 1.5)


def test_kto_shuffles_and_pairs_each_prompt_with_another_prompts_completion(tmp_path, tokenizer):
    trainer, dataset = preference_trainer(
        tmp_path, tokenizer, "stage=kto", "data=kto_sample", "training.per_device_train_batch_size=3", rows=30
    )
    rows = trainer.train_dataset.to_list()
    original = dataset.to_list()  # the sample's rows: a prompt's completions side by side
    shuffled = [{k: v for k, v in row.items() if k != "KL_completion_ids"} for row in rows]
    assert shuffled != original and sorted(map(str, shuffled)) == sorted(map(str, original))
    prompts_of = {}
    for row in original:
        prompts_of.setdefault(tuple(row["completion_ids"]), set()).add(tuple(row["prompt_ids"]))
    for row in rows:  # no KL row pairs a prompt with a completion of its own
        assert tuple(row["prompt_ids"]) not in prompts_of[tuple(row["KL_completion_ids"])]
    for start in range(0, 30, 3):  # where a batch allows it, the KL term uses the batch's own completions
        batch = rows[start : start + 3]
        if len({tuple(row["prompt_ids"]) for row in batch}) == 3:
            assert sorted(r["KL_completion_ids"] for r in batch) == sorted(r["completion_ids"] for r in batch)


def test_kto_kl_partners_are_deterministic_in_the_seed():
    prompts = [[1], [1], [2], [2], [3], [3], [3], [3], [3], [4]]  # prompt 3 fills more than half a batch
    order, partners = kl_partners(prompts, batch_size=4, seed=42)
    assert (order, partners) == kl_partners(prompts, batch_size=4, seed=42)
    assert order != kl_partners(prompts, batch_size=4, seed=7)[0]
    assert sorted(order) == list(range(10))
    assert all(prompts[order[p]] != prompts[order[q]] for p, q in enumerate(partners))
    with pytest.raises(ValueError, match="every row has the same prompt"):
        kl_partners([[1], [1]], batch_size=2, seed=0)


def test_model_logits_score_what_trls_chunked_head_scores(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    config = load_config(composed("stage=dpo", "data=preference_sample"))
    records = load_preferences(config.data.path, "preference").records[:2]
    rows, _ = encode_preference_records(records, tokenizer, objective="dpo", max_length=256)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows.to_list())
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs, grads = [], []
    for patch in (lambda m: add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1")),
                  score_with_model_logits):  # fmt: skip
        model = build_model(config.model, tokenizer, dtype=torch.float32, seed=0)
        patch(model)
        out = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        )
        out.log_probs.sum().backward()
        outputs.append(out)
        grads.append(model.model.layers[-1].mlp.down_proj.weight.grad)
    trl, ours = outputs
    assert (ours.log_probs[labels[:, 1:] == -100] == 0).all()
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(trl, name), atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.is_top1, trl.is_top1)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_qlora_dpo_trains_an_fp32_adapter_on_cpu_with_no_reference_copy(tmp_path, tokenizer):
    trainer, _ = preference_trainer(
        tmp_path, tokenizer, "method=qlora", "training.max_steps=2", *STEADY, rows=2
    )
    assert trainer.ref_model is None and trainer.model.is_loaded_in_4bit
    adapter = [p for p in trainer.model.parameters() if p.requires_grad]
    if not torch.cuda.is_available():  # TRL casts it to bf16, ~200x slower on CPU; we keep the run's dtype
        assert adapter and {p.dtype for p in adapter} == {torch.float32}
    trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0]


@pytest.mark.slow
def test_a_qlora_sft_adapter_goes_on_training_in_4bit_against_its_exact_copy(tmp_path, tokenizer):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from test_export import trained_run

    (tmp_path / "sft").mkdir()
    trained_run(tmp_path / "sft", tokenizer, "qlora")
    (tmp_path / "dpo").mkdir()
    trainer, _ = preference_trainer(
        tmp_path / "dpo", tokenizer, "method=qlora", f"stage.init_from={tmp_path / 'sft'}", "training.seed=7"
    )
    model = trainer.model
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "ref"}
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    saved = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in name for name in trained)
    for name, parameter in trained.items():  # the SFT adapter, to the bit, in fp32 (not TRL's bf16)
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter.float(), saved[name.replace(".default", "")].float()), name
        assert torch.equal(parameter, model.get_parameter(name.replace(".default.", ".ref.")))


@pytest.mark.slow
def test_full_dpo_keeps_a_frozen_copy_as_reference(tmp_path, tokenizer):
    trainer, _ = preference_trainer(tmp_path, tokenizer, "method=full", "training.max_steps=2", *STEADY)
    policy, reference = trainer.model, trainer.ref_model
    assert reference is not None and reference is not policy
    assert not any(p.requires_grad for p in reference.parameters())
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainer.train()
    after = dict(policy.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the policy trained
    for name, p in reference.named_parameters():  # the reference did not
        assert torch.equal(p, before[name]), name


@pytest.mark.slow
def test_full_dpo_from_an_adapter_stores_weights_as_the_precision_policy_says(tmp_path, tokenizer):
    """A LoRA SFT run merged into its base for full DPO: with a bf16 compute dtype the weights are fp32 where
    they are their own master copy (one process; DDP the same) and bf16 where the engine keeps the fp32
    master (FSDP2, DeepSpeed), as ``build_model`` stores them (``train.model.build.weights_dtype``); they were
    bf16 everywhere."""
    from test_export import trained_run

    from train.export import base_of
    from train.model.placement import Placement

    (tmp_path / "sft").mkdir()
    trained_run(tmp_path / "sft", tokenizer, "lora")
    config = load_config(
        composed("stage=dpo", "data=preference_sample", "method=full", f"stage.init_from={tmp_path / 'sft'}")
    )
    merged = {}
    for engine, stored in [("NO", torch.float32), ("FSDP", torch.bfloat16), ("DEEPSPEED", torch.bfloat16)]:
        placement = Placement(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), engine=engine,
                              loads_on_rank_zero=False, zero3_init=False)  # fmt: skip
        model = init_model(config, tokenizer, torch.bfloat16, placement)
        parameters = list(model.parameters())
        assert {p.dtype for p in parameters} == {stored} and all(p.requires_grad for p in parameters), engine
        merged[engine] = model.state_dict()
    base_config, seed = base_of(config)
    base = build_model(base_config, tokenizer, dtype=torch.float32, seed=seed).state_dict()
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged["NO"][query], base[query])  # the adapter is in the weights
    for name, weight in merged["NO"].items():  # the same weights, only stored as each engine needs
        assert torch.equal(merged["FSDP"][name], weight.to(torch.bfloat16)), name


# ── what fails before any work ─────────────────────────────────────────────────────────────────
def test_chat_data_with_dpo_and_pairs_with_sft_fail_with_what_to_use():
    chats = r"data=sample is 'messages', which holds chats, but stage=dpo trains on preference pairs \(data="
    with pytest.raises(ConfigError, match=chats):
        load_config(composed("stage=dpo"))
    with pytest.raises(
        ConfigError, match=r"'preference', which holds preference pairs, but stage=sft .*stage=dpo"
    ):
        load_config(composed("data=preference_sample"))
    with pytest.raises(
        ConfigError, match=r"'kto', which holds labelled completions .*use such data, or stage=kto"
    ):
        load_config(composed("stage=dpo", "data=kto_sample"))
    with pytest.raises(ConfigError, match=r"stage.desirable_weight: not a setting of stage=dpo"):
        load_config(composed("stage=dpo", "data=preference_sample", "stage.desirable_weight=2"))
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size: KTO .* at least 2"):
        load_config(composed("stage=kto", "data=kto_sample", "training.per_device_train_batch_size=1"))


@pytest.mark.slow
def test_wrong_dataset_shape_and_chat_data_stop_at_start(tmp_path):
    result = run_train(
        "stage=dpo", "data=preference_sample", f"data.path={SAMPLES / 'kto_sample.jsonl'}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no 'chosen' or 'rejected' field" in result.stderr and "data.format=kto" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="stage=kto trains on labelled completions"):
        load_config(composed("stage=kto"))  # chat data: refused as the config loads


def test_planner_counts_the_reference_model():
    config = load_config(
        composed("model=8b", "method=full", "stage=dpo", "data=preference_sample"), check=False
    )
    assert reference_model(config) == "weights"
    full = plan_memory(config.model, config.method, config.launch, seq_len=1024, batch=1, stage="dpo",
                       reference="weights")  # fmt: skip
    assert full.per_gpu_bytes["reference"] == 2 * full.params  # one more copy in bf16
    sft = plan_memory(config.model, config.method, config.launch, seq_len=1024, batch=1)
    assert (
        full.activations_bytes["without_checkpointing"] == 2 * sft.activations_bytes["without_checkpointing"]
    )
    assert "reference model" in format_plan(full) and REFERENCES["weights"] in format_plan(full)
    lora = load_config(composed("model=8b", "stage=kto", "data=kto_sample"), check=False)
    assert reference_model(lora) == "base"
    plan = plan_memory(
        lora.model, lora.method, lora.launch, seq_len=1024, batch=2, stage="kto", reference="base"
    )
    assert plan.per_gpu_bytes["reference"] == 0 and REFERENCES["base"] in format_plan(plan)


# ── end to end: SFT, then DPO from it; KTO ──────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("preference-runs")


@pytest.fixture(scope="module")
def sft_run(workdir):
    run_dir = workdir / "sft"
    result = run_train(f"hydra.run.dir={run_dir}", "training.max_steps=3", *STEADY, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def pairs(workdir):
    return write_jsonl(workdir / "pairs.jsonl", sample_records("preference_sample.jsonl", 2))


def dpo_from_sft(run_dir, sft_run, pairs, *overrides: str):
    """DPO from the SFT run, on 2 pairs at batch 2 (each step sees them all), another seed than the SFT's."""
    result = run_train(
        f"hydra.run.dir={run_dir}",
        "stage=dpo",
        "data=preference_sample",
        f"data.path={pairs}",
        f"stage.init_from={sft_run}",
        "training.seed=7",
        "training.max_steps=4",
        "training.save_steps=2",
        *STEADY,
        *overrides,
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def dpo_run(workdir, sft_run, pairs):
    return dpo_from_sft(workdir / "dpo", sft_run, pairs)


@pytest.mark.slow
def test_dpo_from_sft_is_recorded_in_its_config(dpo_run, sft_run):
    config = OmegaConf.load(dpo_run / "config.yaml")
    assert config.stage.name == "dpo" and config.stage.init_from == str(sft_run)
    assert config.stage.init_config == str((sft_run / "config.yaml").resolve())
    assert (config.stage.beta, list(config.stage.loss_type)) == (0.1, ["sigmoid"])


@pytest.mark.slow
def test_dpo_starts_from_the_sft_policy_and_its_margin_grows(dpo_run, sft_run, pairs, tokenizer):
    from train.export import adapter_model

    records = load_preferences(pairs, "preference").records
    rows, _ = encode_preference_records(records, tokenizer, objective="dpo", max_length=256)  # as the run

    def mean_logp(model, name: str) -> float:
        """The mean over the pairs of log p(completion | prompt), as DPOTrainer logs logps/chosen."""
        total = 0.0
        for row in rows:
            ids, start = torch.tensor([row["prompt_ids"] + row[f"{name}_ids"]]), len(row["prompt_ids"])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            total += logp[start - 1 :].gather(-1, ids[0, start:].unsqueeze(-1)).sum().item()
        return total / len(rows)

    sft, _ = adapter_model(sft_run)
    assert logged(dpo_run, "logps/chosen")[0] == pytest.approx(mean_logp(sft.eval(), "chosen"), rel=1e-4)
    losses, margins = logged(dpo_run, "loss"), logged(dpo_run, "rewards/margins")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and margins[0] == 0  # policy == reference
    assert losses[-1] < losses[0] - 0.05 and margins[-1] > margins[1] > 0, (losses, margins)
    dpo, _ = adapter_model(dpo_run)  # the DPO adapter on the SFT run's base (train.export.base_of)
    dpo.eval()
    assert mean_logp(dpo, "chosen") - mean_logp(dpo, "rejected") > mean_logp(sft, "chosen") - mean_logp(
        sft, "rejected"
    )


@pytest.mark.slow
def test_dpo_resumes_where_it_stopped(dpo_run, sft_run, pairs, workdir):
    checkpoint = dpo_run / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "COMPLETE").is_file()
    resumed_dir = dpo_from_sft(
        workdir / "dpo-resumed", sft_run, pairs, f"training.resume_from_checkpoint={checkpoint}"
    )
    resumed = {row["step"]: row for row in read_metrics(resumed_dir / "metrics.jsonl") if "loss" in row}
    uninterrupted = {row["step"]: row for row in read_metrics(dpo_run / "metrics.jsonl") if "loss" in row}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "rewards/margins"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], abs=1e-5), (step, key)


@pytest.mark.slow
def test_start_from_a_run_is_checked_before_any_work(sft_run, tmp_path):
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            load_config(composed("stage=dpo", "data=preference_sample", *overrides))
        return str(error.value)

    assert "is not a directory" in problems(f"stage.init_from={tmp_path / 'nowhere'}")
    assert "no config.yaml" in problems(f"stage.init_from={tmp_path}")
    assert "hidden_size 128, but this run's model=tiny has 64; use model=tiny" in problems(
        f"stage.init_from={sft_run}", "model.hidden_size=64"
    )
    assert "trained a lora adapter" in problems(f"stage.init_from={sft_run}", "method=qlora")
    with pytest.raises(
        ConfigError, match=r"stage.init_from: starting from another run is for stage=dpo, kto, rm or grpo"
    ):
        load_config(composed(f"stage.init_from={sft_run}"))


@pytest.mark.slow
def test_kto_trains_with_lora_and_separates_desirable_from_undesirable(workdir):
    # one of each label, of two prompts: KTO's KL term pairs each prompt with the other's completion
    rows = write_jsonl(workdir / "kto.jsonl", sample_records("kto_sample.jsonl", 4)[::3])
    run_dir = workdir / "kto"
    result = run_train(
        f"hydra.run.dir={run_dir}",
        *("stage=kto", "data=kto_sample", f"data.path={rows}", "training.max_steps=4", *STEADY),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses, margins = logged(run_dir, "loss"), logged(run_dir, "rewards/margins")
    assert (
        losses[0] == pytest.approx(0.5, abs=1e-6) and margins[0] == 0
    )  # policy == reference: 1 - sigmoid(0)
    assert losses[-1] < losses[0] - 0.01 and margins[-1] > 0, (losses, margins)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
