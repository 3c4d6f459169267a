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
    from train.outputs import save_resolved_config
    from train.run_dir import run_config

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
        # keys that are no field of TRL's SFTConfig: every one named in one message (checked against trl's
        # dataclass, a 7 s import: one run for the three)
        (("training.max_stepz=3", "training.ddp_timout=600", "+training.foo=1"),
         ("training.max_stepz", "did you mean ddp_timeout?", "training.foo")),
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
    step 0 (train/quantized_loading.py): refused as the config loads, with what works."""
    overrides = ("stage=dpo", "data=preference_sample", "method=qlora", "launch.num_processes=2")
    with pytest.raises(ConfigError) as error:
        load_config(composed(*overrides, "launch=zero3", "+training.precompute_ref_log_probs=true"))
    assert "training.precompute_ref_log_probs: TRL scores the reference in the trainer's constructor" in str(
        error.value
    )
    assert "or use launch=ddp" in str(error.value)
    load_config(composed(*overrides, "launch=ddp", "+training.precompute_ref_log_probs=true"))  # loads
