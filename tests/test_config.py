"""Config composition: the schema catches typos and wrong types, validate() catches what spans fields."""

from __future__ import annotations

import pytest
from conftest import REPO, run_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import Config, ConfigError, load_config, register_configs, trl_settings

register_configs()
CONF = REPO / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.update(cfg, "output_dir", "/tmp/unused", force_add=True)  # hydra:runtime needs a live run
    return cfg


def test_default_composes_to_tiny_lora_sample_local():
    config = load_config(composed())
    assert isinstance(config, Config)
    assert (config.model.name, config.method.name, config.data.name, config.launch.name) == (
        "tiny",
        "lora",
        "sample",
        "local",
    )
    assert (
        config.model.vocab_size == 128_256
        and config.model.num_key_value_heads < config.model.num_attention_heads
    )
    assert config.model.rope_scaling.rope_type == "llama3" and config.model.rope_theta == 500_000.0
    assert config.method.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.data.path.endswith("data/samples/oasst_sample.jsonl")


@pytest.mark.parametrize("group_option", [p.stem for p in (CONF / "model").glob("*.yaml")])
def test_every_model_size_composes(group_option):
    config = load_config(composed(f"model={group_option}"))
    assert config.model.name == group_option


@pytest.mark.parametrize("experiment", [p.stem for p in (CONF / "experiment").glob("*.yaml")])
def test_every_experiment_composes(experiment):
    load_config(composed(f"+experiment={experiment}"))


@pytest.mark.parametrize("data", [p.stem for p in (CONF / "data").glob("*.yaml")])
def test_every_shipped_data_config_validates_for_the_stage_it_serves(data):
    """Each format is one a stage trains on (train.config.STAGE_FORMATS): a new reader is wired end to end."""
    served = {"preference_sample": "dpo", "kto_sample": "kto", "reward_sample": "rm"}
    stage = {**served, "arithmetic_sample": "grpo"}.get(data, "sft")
    config = load_config(composed(f"data={data}", f"stage={stage}"))
    assert config.data.name == data


def test_a_messages_field_on_a_format_without_a_message_list_is_refused():
    with pytest.raises(ConfigError) as error:
        load_config(composed("data=alpaca_sample", "data.messages_field=turns"))
    assert "data.messages_field: applies to formats messages, sharegpt, not 'alpaca'; remove it" in str(
        error.value
    )


def test_cross_field_problems_are_reported_together():
    cfg = composed("method.name=dora", "training.max_length=200000", "model.dtype=fp8")
    with pytest.raises(ConfigError) as error:
        load_config(cfg)
    message = str(error.value)
    assert "method.name: 'dora'" in message
    assert "training.max_length: 200000 exceeds the model's context (131072)" in message
    assert "model.dtype: 'fp8'" in message


def test_missing_paths_are_refused_before_any_work(tmp_path):
    cfg = composed(f"data.path={tmp_path}/chats.jsonl", f"model.path={tmp_path}/Llama-3.1-8B")
    with pytest.raises(ConfigError) as error:
        load_config(cfg)
    assert f"data.path: {tmp_path}/chats.jsonl is not a file" in str(error.value)
    assert f"model.path: {tmp_path}/Llama-3.1-8B is not a directory" in str(error.value)


def test_lora_without_rank_is_refused():
    with pytest.raises(ConfigError, match=r"method.r: required for lora"):
        load_config(composed("method.r=null"))


def test_trl_fields_pass_through_with_or_without_plus(tmp_path):
    from train.run.outputs import save_resolved_config
    from train.run.run_dir import run_config

    appended = "+training.gradient_checkpointing_kwargs={use_reentrant:false}"
    cfg = composed("training.ddp_timeout=600", appended)
    settings = trl_settings(load_config(cfg).training)
    assert settings["ddp_timeout"] == 600
    assert settings["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert settings["max_steps"] == 40  # the typed ones too
    save_resolved_config(cfg, tmp_path)  # and a run directory's config.yaml reads back with them
    assert trl_settings(run_config(tmp_path).training)["ddp_timeout"] == 600


def test_a_pass_through_typo_names_the_nearest_fields():
    with pytest.raises(ConfigError) as error:
        load_config(composed("training.ddp_timout=600", "training.max_stepz=3"))
    unknown = "not a field of TRL's SFTConfig (stage=sft)"
    assert f"training.ddp_timout: {unknown}; did you mean ddp_timeout?" in str(error.value)
    assert f"training.max_stepz: {unknown}; did you mean max_steps," in str(error.value)


def test_a_setting_of_another_stage_or_of_the_run_is_refused_naming_where_it_belongs():
    with pytest.raises(ConfigError) as error:
        load_config(composed("+training.precompute_ref_log_probs=true", "training.bf16=true"))
    message = str(error.value)
    assert (
        "training.precompute_ref_log_probs: a setting of stage=dpo or kto (DPOConfig, KTOConfig), "
        "not of stage=sft (SFTConfig); remove it"
    ) in message
    assert "training.bf16: set by the run from model.dtype; set that instead" in message
    with pytest.raises(ConfigError) as error:
        load_config(composed("stage=dpo", "data=preference_sample", "training.completion_only_loss=true"))
    assert "a setting of stage=sft (SFTConfig), not of stage=dpo (DPOConfig)" in str(error.value)
    with pytest.raises(ConfigError, match=r"training.beta: set by the run from stage.beta"):
        load_config(composed("stage=dpo", "data=preference_sample", "training.beta=0.3"))


# The command line, as a user meets it: non-zero exit and a message naming the key, before any work.
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # keys that are no field of TRL's SFTConfig or peft's LoraConfig: every one named in one message
        # (checked against trl's and peft's dataclasses, a 7 s import: one run for the four)
        (("training.max_stepz=3", "training.ddp_timout=600", "+training.foo=1", "method.use_dorra=true"),
         ("training.max_stepz", "did you mean ddp_timeout?", "training.foo",
          "method.use_dorra: not a field of peft's LoraConfig; did you mean use_dora")),
        (("model.hidden_size=wide",), ("model.hidden_size",)),
        (("method=dora",), ("method/dora",)),
        (("data.path=/nowhere/chats.jsonl",), ("data.path: /nowhere/chats.jsonl is not a file",)),
    ],
)  # fmt: skip
def test_bad_command_line_fails_naming_the_key(tmp_path, overrides, expected):
    result = run_train(*overrides, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert all(message in result.stderr for message in expected), result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_bad_value_in_a_group_file_fails_naming_the_key(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        (CONF / "model" / "tiny.yaml").read_text() + "hiden_size: 32\n"
    )
    result = run_train(
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=mine", cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert "hiden_size" in result.stderr


def test_a_run_that_cannot_fit_is_refused_before_any_weight_loads(tmp_path):
    result = run_train("model=405b", "method=full", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "does not fit launch=local on " in result.stderr and "this machine's" in result.stderr  # GPU, CPU
    assert "planner figures: peak" in result.stderr and "launch=fsdp launch.num_processes=8" in result.stderr
    assert not list((tmp_path / "outputs").glob("*/*/config.yaml"))  # our resolved config: never reached


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("size", ["tiny", "1b", "3b", "8b", "70b", "70b_3_3", "405b"])
def test_every_size_and_method_composes_and_is_planned(size, method):
    from train.plan import Device, fit_problems

    config = load_config(composed(f"model={size}", f"method={method}"))
    assert (config.model.name, config.method.name) == (size, method)
    assert config.model.gradient_checkpointing == (size != "tiny")  # on for 1B and up
    problems = fit_problems(config, Device.configured(config.launch))  # one 80 GB GPU: fits, or refused
    assert all("planner figures" in p and "try:" in p for p in problems)
    assert bool(problems) == (
        (size, method)
        in {
            ("8b", "full"),
            ("70b", "full"),
            ("70b", "lora"),
            ("70b_3_3", "full"),
            ("70b_3_3", "lora"),
            ("405b", "full"),
            ("405b", "lora"),
            ("405b", "qlora"),
        }
    )


def test_qlora_dpo_under_sharding_cannot_score_its_reference_before_the_weights_load():
    """TRL's precompute_ref_log_probs runs in the trainer's constructor; sharded QLoRA's weights arrive at
    step 0 (train/model/quantized_loading.py): refused as the config loads, with what works."""
    overrides = ("stage=dpo", "data=preference_sample", "method=qlora", "launch.num_processes=2")
    with pytest.raises(ConfigError) as error:
        load_config(composed(*overrides, "launch=zero3", "+training.precompute_ref_log_probs=true"))
    assert "training.precompute_ref_log_probs: TRL scores the reference in the trainer's constructor" in str(
        error.value
    )
    assert "or use launch=ddp" in str(error.value)
    load_config(composed(*overrides, "launch=ddp", "+training.precompute_ref_log_probs=true"))  # loads


def test_lora_config_fields_pass_through_and_typos_name_the_nearest_fields():
    """method.* takes every field of peft's LoraConfig under its own name, checked against the installed
    dataclass before anything loads, as training.* is against TRL's."""
    from train.config import lora_settings

    config = load_config(composed(
        "method.use_dora=true", "method.use_rslora=true", "method.init_lora_weights=pissa_niter_16",
        "method.target_modules=all-linear", "method.modules_to_save=[lm_head]", "method.loraplus_lr_ratio=16",
    ))  # fmt: skip
    assert lora_settings(config.method) == {
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "use_dora": True,
        "use_rslora": True, "init_lora_weights": "pissa_niter_16", "modules_to_save": ["lm_head"],
    }  # fmt: skip
    assert config.method.loraplus_lr_ratio == 16  # the project's own: not a LoraConfig field
    for init in ("true", "false", "gaussian", "pissa", "olora", "mica"):
        load_config(composed(f"method.init_lora_weights={init}"))
    with pytest.raises(ConfigError) as error:
        load_config(
            composed("method.use_dorra=true", "method.task_type=SEQ_CLS", "method.inference_mode=true")
        )
    message = str(error.value)
    assert (
        "method.use_dorra: not a field of peft's LoraConfig; did you mean use_dora, use_bdlora, use_rslora?"
        in (message)
    )
    assert (
        "method.task_type: set by the run from stage.name (a causal LM: CAUSAL_LM; stage=rm, a reward model: "
        "SEQ_CLS); remove it" in (message)
    )
    assert "method.inference_mode: set by the run from the stage (it trains;" in message
    assert "refuses" not in message  # the keys peft has no field for are not handed to it
    with pytest.raises(
        ConfigError, match=r"method.use_dora: a LoRA setting, and method=full trains no adapter"
    ):
        load_config(composed("method=full", "method.use_dora=true"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # peft's own checks (LoraConfig.__post_init__), before anything loads
        (("method.use_dora=true", "method.lora_bias=true"),
         "method: peft's LoraConfig refuses these settings: The argument lora_bias=True is not supported "
         "for DoRA"),
        (("method.init_lora_weights=pisa",),
         "method.init_lora_weights: 'pisa' is not one of peft's: true, false, gaussian, orthogonal, pissa, "
         "pissa_niter_<n>, olora, mica, loftq, eva, corda, lora_ga"),
        (("method.init_lora_weights=orthogonal", "method.r=7"),
         "method.init_lora_weights=orthogonal: peft needs an even rank (it splits r in two); method.r is 7"),
        # what needs a pass over the data, or replaces the base
        (("method.init_lora_weights=eva",),
         "method.init_lora_weights=eva: EVA initializes from an SVD of each layer's inputs over the data "
         "(peft's initialize_lora_eva_weights), a pass a run does not make"),
        (("method.init_lora_weights=loftq",),
         "method.init_lora_weights=loftq: LoftQ replaces the base weights by their own 4-bit quantization"),
        # decompositions of the base weight: not of 4-bit weights, nor where ranks lack it, nor under DPO
        (("method=qlora", "method.init_lora_weights=pissa"),
         "method.init_lora_weights=pissa: peft runs an SVD of float weights and refuses 4-bit ones "
         "(peft/tuners/lora/layer.py pissa_init: TypeError); use method=lora"),
        (("method=qlora", "method.init_lora_weights=olora"),
         "method.init_lora_weights=olora: peft re-quantizes the residual W - scale x B0A0, so the adapter is "
         "right only on that re-quantized base, which no checkpoint holds"),
        (("launch=fsdp", "launch.num_processes=2", "method.init_lora_weights=olora"),
         "method.init_lora_weights=olora: peft computes it from the base weights when it wraps the model, "
         "and under fsdp not every rank holds them then (FSDP: ranks but 0 hold empty tensors until "
         "accelerate broadcasts rank 0's"),
        (("launch=zero3", "launch.num_processes=2", "method.init_lora_weights=pissa_niter_4"),
         "method.init_lora_weights=pissa_niter_4: peft computes it from the base weights when it wraps the "
         "model, and under zero3"),
        (("stage=dpo", "data=preference_sample", "method.init_lora_weights=pissa"),
         "method.init_lora_weights=pissa: stage=dpo scores its reference with the adapter disabled (TRL), "
         "and pissa changes that base to the residual W - scale x B0A0, which is not the starting model"),
        # sharded QLoRA's skeleton is filled at step 0, after peft read it
        (("method=qlora", "launch=fsdp", "launch.num_processes=2", "method.use_dora=true"),
         "method.use_dora: DoRA's magnitudes are the base weights' row norms, taken when peft wraps the "
         "model, and under fsdp QLoRA's weights are read and quantized at step 0 "
         "(train/model/quantized_loading.py), after peft has wrapped the model's empty skeleton; use "
         "launch=ddp or zero2, or method=lora"),
        (("method=qlora", "launch=zero3", "launch.num_processes=2", "method.modules_to_save=[lm_head]"),
         "method.modules_to_save: peft copies these modules when it wraps the model, and under zero3 QLoRA's "
         "weights are read and quantized at step 0"),
        (("method.modules_to_save=[lm_head,q_proj,score]",),
         "method.modules_to_save: 'score' is no module of Llama 3.1 that trains whole; use names from "
         "embed_tokens, lm_head, norm"),
        (("method.modules_to_save=[q_proj]",),
         "method.modules_to_save: q_proj is also a LoRA target (method.target_modules); train it one way"),
        (("model.tie_word_embeddings=true", "method.modules_to_save=[lm_head]"),
         "method.modules_to_save: lm_head is one tensor with the other embedding in this model "
         "(model.tie_word_embeddings), and peft copies only what it names"),
        (("method.loraplus_lr_ratio=0",), "method.loraplus_lr_ratio: 0.0; a number > 0"),
        (("method.loraplus_lr_ratio=16", "training.optim=galore_adamw"),
         "method.loraplus_lr_ratio: training.optim=galore_adamw builds its own parameter groups"),
        (("method=full", "method.loraplus_lr_ratio=16"),
         "method.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices, and method=full has "
         "none"),
    ],
)  # fmt: skip
def test_adapter_settings_that_cannot_run_are_refused_with_the_reason(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(composed(*overrides))
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ("method=qlora", "method.use_dora=true", "method.use_rslora=true",
         "method.target_modules=all-linear"),
        ("method=qlora", "launch=ddp", "launch.num_processes=2", "method.use_dora=true"),
        ("launch=fsdp", "launch.num_processes=2", "method.use_dora=true", "method.loraplus_lr_ratio=16",
         "method.modules_to_save=[lm_head]"),
        ("launch=zero3", "launch.num_processes=2", "method.use_dora=true",
         "method.init_lora_weights=gaussian"),
        ("launch=zero2", "launch.num_processes=2", "method.init_lora_weights=pissa"),
        ("stage=dpo", "data=preference_sample", "method.use_dora=true", "method.init_lora_weights=mica"),
        ("model.tie_word_embeddings=true", "method.modules_to_save=[lm_head]",
         "method.ensure_weight_tying=true"),
    ],
)  # fmt: skip
def test_adapter_settings_that_peft_and_the_launch_support_load(overrides):
    load_config(composed(*overrides))
