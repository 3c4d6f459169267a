"""Merge a run's LoRA/QLoRA adapter into its base weights and write a plain transformers checkpoint, or a
GGUF file of it for llama.cpp and Ollama.

    python -m train.export run=outputs/2026-11-26/10-00-00 [out=<dir>]
    python -m train.export run=outputs/2026-11-26/10-00-00 format=gguf [type=f16|bf16|q8_0] [out=<dir>]

The base is the run's own (``model.path``, or the random weights its seed rebuilds; for a run started
from another run, that run's weights or base: ``base_of``). For QLoRA the adapter was trained against
the 4-bit weights, so those are what it is merged into: the base loads in 4-bit as in training and is
dequantized first, so the merged model computes what the trained one did. The result (safetensors,
config, tokenizer) loads with ``AutoModelForCausalLM.from_pretrained`` and needs neither peft nor
bitsandbytes.

The merge runs on the CPU, GPU or not: the base loads into host memory in the run's dtype (a 70B base in
bf16 needs ~141 GB of RAM, plus ~40 GB of 4-bit weights while a QLoRA base dequantizes), never onto one
GPU, and is written shard by shard (``train.model.sharded_save``, ``training.max_shard_size`` per file).

``format=gguf`` converts the merged checkpoint (``<run>/merged``, merged first when missing or older than
the adapter; a full run's ``model/``) to ``<out>/model-<type>.gguf`` (default ``<run>/gguf/``), tensor by
tensor (``train.model.gguf``): the GGUF pass holds one tensor at a time, never a second copy of the model.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from train.config import Config, ConfigError, ModelConfig
from train.model.gguf import DEFAULT_TYPE, GGUFError, check_type, gguf_file_name, safetensors_files
from train.run.outputs import final_dir
from train.run.run_dir import run_config


def base_of(config: Config) -> tuple[ModelConfig, int]:
    """The model config and seed that rebuild the weights a run started on: its own base, or, for a run
    started from another (``stage.init_from``), that run's ``model/`` (full) or, in turn, its base (adapters).

    Only ``path`` is taken from the other run; the architecture is the same (``train.config.validate``).
    """
    if config.stage.init_from is None:
        return config.model, config.training.seed
    start = Path(config.stage.init_from)
    previous = run_config(start)
    if previous.method.name == "full":
        return replace(config.model, path=str(final_dir(start, "full"))), config.training.seed
    base, seed = base_of(previous)
    return replace(config.model, path=base.path), seed


def adapter_model(run_dir: Path):
    """The run's base model (dequantized for QLoRA) with its adapter attached, not yet merged."""
    from peft import PeftModel

    from data import tokenizer_for
    from train.model.build import build_model, compute_dtype, load_4bit

    config = run_config(run_dir)
    adapter = final_dir(run_dir, config.method.name)
    if config.method.name == "full":
        raise ConfigError(f"{run_dir} is a full fine-tuning run: its {adapter} already loads in transformers")
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json; did the run finish?")
    tokenizer = tokenizer_for(config.model)
    dtype = compute_dtype(config.model.dtype)
    base_config, seed = base_of(config)
    # no placement: every weight loads (and a 4-bit base quantizes and dequantizes) on the CPU
    if config.method.load_in_4bit:
        quantized = load_4bit(base_config, tokenizer, dtype=dtype, seed=seed, method=config.method)
        # Dequantize to the dtype the 4-bit forward dequantizes to (bitsandbytes' quant state), so the
        # merged weights are the ones training saw, then compute in the run's dtype.
        state = next(
            m.weight.quant_state
            for m in quantized.modules()
            if hasattr(m, "weight") and hasattr(m.weight, "quant_state")
        )
        base = quantized.dequantize(dtype=state.dtype).to(dtype)
    else:
        base = build_model(base_config, tokenizer, dtype=dtype, seed=seed)
    devices = {parameter.device.type for parameter in base.parameters()}
    if devices != {"cpu"}:
        raise RuntimeError(f"export merges on the CPU, but the base of {run_dir} loaded on {sorted(devices)}")
    # peft reads the adapter onto the GPU when there is one (its infer_device), however the base is placed
    return PeftModel.from_pretrained(base, adapter, torch_device="cpu"), tokenizer


def merged_model(run_dir: Path):
    """The run's base model with its adapter merged in, in the run's compute dtype."""
    model, tokenizer = adapter_model(run_dir)
    return model.merge_and_unload(), tokenizer


def export(run_dir: Path, out: Path | None = None) -> Path:
    """Write the merged checkpoint (safetensors shards, in the run's dtype) and tokenizer to ``out``
    (default ``<run>/merged``)."""
    from train.model.build import compute_dtype
    from train.model.sharded_save import save_full_model

    out = out or run_dir / "merged"
    config = run_config(run_dir)
    model, tokenizer = merged_model(run_dir)
    save_full_model(
        model,
        out,
        is_writer=True,
        dtype=compute_dtype(config.model.dtype),
        max_shard_size=config.training.max_shard_size,
    )
    tokenizer.save_pretrained(out)
    return out


def gguf_source(run_dir: Path) -> Path:
    """The merged checkpoint a GGUF export reads: a full run's ``model/``; else ``<run>/merged``, merged now
    (``export``) when it has no weights or is older than the adapter. Refuses, before any weight loads, a
    run that left neither weights nor an adapter."""
    config = run_config(run_dir)
    if config.method.name == "full":
        model_dir = final_dir(run_dir, "full")
        if not has_weights(model_dir):
            raise ConfigError(f"{model_dir}: no safetensors weights; did the run finish?")
        return model_dir
    adapter, merged = final_dir(run_dir, config.method.name), run_dir / "merged"
    adapter_file = adapter / "adapter_model.safetensors"
    if has_weights(merged) and (
        not adapter_file.is_file() or newest_weight(merged) >= adapter_file.stat().st_mtime
    ):
        return merged
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json, and no {merged}; did the run finish?")
    return export(run_dir)


def has_weights(directory: Path) -> bool:
    try:
        return bool(safetensors_files(directory))
    except GGUFError:
        return False


def newest_weight(directory: Path) -> float:
    return max(file.stat().st_mtime for file in safetensors_files(directory))


def export_gguf(run_dir: Path, out: Path | None = None, type: str = DEFAULT_TYPE) -> Path:
    """Write the run's merged model as ``<out>/model-<type>.gguf`` (default ``<run>/gguf/``), merging the
    adapter first if needed (``gguf_source``); returns the file's path."""
    from train.model.gguf import write_gguf

    check_type(type)
    source = gguf_source(run_dir)
    return write_gguf(source, (out or run_dir / "gguf") / gguf_file_name(type), type, name=run_dir.name)


USAGE = (
    "usage: python -m train.export run=<run directory> [out=<directory>] [format=safetensors|gguf] "
    "[type=f16|bf16|q8_0 (format=gguf)]"
)


def main(argv: list[str]) -> int:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = set(options) - {"run", "out", "format", "type"} or {a for a in argv if "=" not in a}
    if "run" not in options or unknown:
        print(USAGE, file=sys.stderr)
        return 2
    run_dir, out = Path(options["run"]), Path(options["out"]) if "out" in options else None
    output_format, gguf_type = options.get("format", "safetensors"), options.get("type")
    try:
        if output_format not in ("safetensors", "gguf"):
            raise ConfigError(f"format={output_format}: expected safetensors (the default) or gguf")
        if gguf_type is not None and output_format != "gguf":
            raise ConfigError(f"type={gguf_type} sets the GGUF type; add format=gguf")
        if output_format == "gguf":
            print(f"GGUF written to {export_gguf(run_dir, out, gguf_type or DEFAULT_TYPE)}")
        else:
            print(f"merged checkpoint written to {export(run_dir, out)}")
    except (ConfigError, GGUFError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
