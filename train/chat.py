"""Chat with a finished run in the terminal, in the exact Llama 3.1 Instruct format.

    python -m train.chat run=outputs/<date>/<time>                  # interactive: /reset, /exit or Ctrl-D
    python -m train.chat run=outputs/<date>/<time> prompt="Hello" [system="You answer briefly."]
        [weights=auto|adapter|merged|model] [max_new_tokens=256] [temperature=0] [top_p=1.0]

One-shot (``prompt=``) prints the reply alone on stdout, for scripts; everything else goes to stderr.

Weights: ``auto`` takes what training left, ``adapter/`` on the run's base (rebuilt as export rebuilds it,
``train.export.base_of``; 4-bit for QLoRA, as trained) or ``model/`` for full fine-tuning, and
``merged/`` (``python -m train.export``) only when those are missing. Not merged first: it is the same
model but, for QLoRA, dequantized to bf16, ~4x the memory of the 4-bit base it was trained on (70B:
~141 GB against ~40 GB), so where training fit, the adapter fits. ``weights=merged`` asks for it.

The model loads on one device, the first GPU or the CPU, in the run's compute dtype
(``train.model.build.compute_dtype``: bf16 on a GPU, fp32 on CPU). ``temperature=0`` is greedy decoding.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from train.config import Config, ConfigError
from train.run.outputs import final_dir
from train.run.run_dir import CHECKPOINTS_DIR, STOPPED_FILE, complete_checkpoints, run_config

log = logging.getLogger("train.chat")

DEFAULTS = {"weights": "auto", "max_new_tokens": "256", "temperature": "0", "top_p": "1.0"}
OPTIONS = ("run", "prompt", "system", *DEFAULTS)
WEIGHTS = ("auto", "adapter", "merged", "model")
MERGED_DIR = "merged"  # where python -m train.export writes by default
USAGE = (
    "usage: python -m train.chat run=<run directory> [prompt=<text>] [system=<text>] "
    "[weights=auto|adapter|merged|model] [max_new_tokens=256] [temperature=0] [top_p=1.0]"
)
USER_PROMPT = ">>> "


@dataclass(frozen=True)
class Sampling:
    """How replies are generated: greedy at ``temperature`` 0, else sampled with nucleus ``top_p``."""

    max_new_tokens: int
    temperature: float
    top_p: float


# ── before any weight: which directory, or why none ─────────────────────────────────────────
def finished(weights: Path) -> bool:
    """A directory holding an adapter (peft) or a whole transformers checkpoint."""
    return (weights / "adapter_config.json").is_file() or (weights / "config.json").is_file()


def choose_weights(run_dir: Path, config: Config, choice: str) -> Path:
    """The weights directory ``choice`` names (module docstring); ConfigError, naming what the run holds and
    what to do, when it is not there."""
    final = final_dir(run_dir, config.method.name)
    merged = run_dir / MERGED_DIR
    if choice not in ("auto", final.name, MERGED_DIR):
        raise ConfigError(
            f"weights={choice}: a {config.method.name} run leaves {final.name}/ (and {MERGED_DIR}/ once "
            f"exported), never {choice}/; use weights={final.name}"
        )
    if choice == MERGED_DIR and not finished(merged):
        raise ConfigError(
            f"{merged}: no merged checkpoint; write it with `python -m train.export run={run_dir}`"
        )
    candidates = [final, merged] if choice == "auto" else [final] if choice == final.name else [merged]
    for weights in candidates:
        if finished(weights):
            return weights
    checkpoints = len(complete_checkpoints(run_dir / CHECKPOINTS_DIR))
    stopped = run_dir / STOPPED_FILE
    state = (
        f"It stopped early ({stopped.read_text().strip()})"
        if stopped.is_file()
        else "The run may still be training, or it stopped before saving them"
    )
    raise ConfigError(
        f"{run_dir}: no finished weights: no {final.name}/ and no {MERGED_DIR}/ (it has {checkpoints} "
        f"complete checkpoint(s)). {state}: resume it with its own command and "
        f"`hydra.run.dir={run_dir} training.resume_from_checkpoint=latest`, then chat"
    )


# ── the model ───────────────────────────────────────────────────────────────────────────────
def load_chat_model(run_dir: Path, weights: Path):
    """``weights`` (a directory ``choose_weights`` returned) ready to generate, and the run's tokenizer.

    An adapter goes on the run's base as in training: rebuilt from ``model.path`` or the run's seed
    (``base_of``), 4-bit on the device for QLoRA. No ``prepare_4bit_for_training``: nothing trains."""
    import torch

    from data import tokenizer_for
    from train.export import base_of
    from train.model.build import (
        attention_implementation,
        build_model,
        compute_dtype,
        load_4bit,
        load_checkpoint,
    )
    from train.model.placement import Placement

    config = run_config(run_dir)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = compute_dtype(config.model.dtype)
    tokenizer = tokenizer_for(config.model)
    if not (weights / "adapter_config.json").is_file():
        attention = attention_implementation(config.model.attn_implementation)
        return load_checkpoint(str(weights), dtype, attention).to(device).eval(), tokenizer

    from peft import PeftModel

    base_config, seed = base_of(config)
    if config.method.load_in_4bit:
        # bitsandbytes quantizes where it loads: this one process's device, as a one-process training run
        here = Placement(0, 0, 1, device, "NO", loads_on_rank_zero=False, zero3_init=False)
        base = load_4bit(base_config, tokenizer, dtype=dtype, seed=seed, method=config.method, placement=here)
    else:
        base = build_model(base_config, tokenizer, dtype=dtype, seed=seed).to(device)
    # peft reads the adapter onto the GPU when there is one (its infer_device), wherever the base is
    return PeftModel.from_pretrained(base, weights, torch_device=str(device)).eval(), tokenizer


# ── one reply ───────────────────────────────────────────────────────────────────────────────
def generate_reply(model, tokenizer, messages: list[dict], sampling: Sampling, streamer=None) -> str:
    """The assistant's reply to ``messages``: generated until ``<|eot_id|>``, ``<|eom_id|>`` or
    ``<|end_of_text|>`` (passed here too, for runs saved before their generation config said so) or
    ``max_new_tokens``; the text without the stop token."""
    import torch

    from data.prompts import prompt_ids
    from data.tokenizer import stop_token_ids

    ids = prompt_ids(messages, tokenizer)
    log.info("prompt: %d tokens, %d messages", len(ids), len(messages))
    input_ids = torch.tensor([ids], device=model.device)
    sampled = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **(sampled if sampling.temperature > 0 else {"do_sample": False}),
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


# ── the terminal ────────────────────────────────────────────────────────────────────────────
def chat_in_terminal(model, tokenizer, system: list[dict], sampling: Sampling) -> None:
    """Read user lines until ``/exit`` or end of input, streaming each reply; the whole conversation is the
    prompt of every turn, ``/reset`` empties it (the system prompt stays)."""
    from transformers import TextStreamer

    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        reply = generate_reply(model, tokenizer, system + history, sampling, streamer)
        history.append({"role": "assistant", "content": reply})


def key_values(argv: list[str], valid: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` arguments (this module's and ``train.evaluate``'s); ConfigError naming the ``valid``
    keys for any other key or an argument without ``=``."""
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = sorted(set(options) - set(valid)) + [arg for arg in argv if "=" not in arg]
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return options


def parse(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments over ``DEFAULTS``; ConfigError naming the valid keys for any other."""
    options = key_values(argv, OPTIONS)
    if "run" not in options:
        raise ConfigError("run= is missing: the run directory to chat with (outputs/<date>/<time>)")
    if options.get("weights", "auto") not in WEIGHTS:
        raise ConfigError(f"weights={options['weights']}: expected one of {', '.join(WEIGHTS)}")
    return {**DEFAULTS, **options}


def sampling_of(options: dict[str, str]) -> Sampling:
    try:
        sampling = Sampling(
            int(options["max_new_tokens"]), float(options["temperature"]), float(options["top_p"])
        )
    except ValueError as error:
        raise ConfigError(f"max_new_tokens, temperature, top_p: {error}") from None
    if sampling.max_new_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ConfigError(f"{sampling}: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
    return sampling


def main(argv: list[str]) -> int:
    try:
        options = parse(argv)
        sampling = sampling_of(options)
        run_dir = Path(options["run"])
        weights = choose_weights(run_dir, run_config(run_dir), options["weights"])
    except ConfigError as error:
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        return 2
    model, tokenizer = load_chat_model(run_dir, weights)
    log.info("loaded %s on %s (%s)", weights, model.device, model.dtype)
    system = [{"role": "system", "content": options["system"]}] if options.get("system") else []
    if "prompt" in options:
        print(
            generate_reply(
                model, tokenizer, [*system, {"role": "user", "content": options["prompt"]}], sampling
            )
        )
        return 0
    print(f"chatting with {weights}; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    try:
        chat_in_terminal(model, tokenizer, system, sampling)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(sys.argv[1:]))
