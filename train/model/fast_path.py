"""The GPU fast path: which of the stack's speed switches a run uses, decided from the device in one place.

Each part is a maintained library's, each is a ``training.*`` key, and ``auto`` (the default) turns it on
where it helps and can run:

- ``training.packing``: conversations packed into rows of ``max_length`` by best-fit decreasing (TRL's
  ``bfd``), padding-free: one row carries several sequences, told apart by ``position_ids`` restarting at
  0; FlashAttention-2's varlen kernel or, without flash-attn, sdpa with a block-diagonal mask that
  transformers builds from those ``position_ids`` (``masking_utils.find_packed_sequence_indices``) keep
  them from attending to each other. ``auto``: on a GPU for SFT (a batch of one short conversation
  leaves most of an 8B step's fixed cost, dequantizing QLoRA's weights three times, paying for few
  tokens); off on a CPU, where the default run is sized per conversation. DPO/KTO rows are never packed.
- ``training.use_liger_kernel``: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (TRL's switch,
  which leaves the loss to TRL's own fused, chunked LM head: the 128,256-token logits never exist).
  ``auto``: where there is a GPU and ``liger-kernel`` is installed (``pip install -e ".[gpu]"``).
- ``training.activation_offloading``: TRL's offloading of the activations the backward keeps to CPU
  memory (CUDA streams, GPU only), for long context; off by default.

``true`` where it cannot run is refused at start with what to do, before anything loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from train.config import ConfigError, TrainingConfig, switch

LIGER = "liger-kernel~=0.8.5"  # the [gpu] extra in pyproject.toml


@dataclass(frozen=True)
class FastPath:
    """The switches as this run uses them, and the attention that computes."""

    packing: bool
    use_liger_kernel: bool
    activation_offloading: bool
    attention: str

    def trl_settings(self) -> dict[str, bool]:
        return {
            "packing": self.packing,
            "use_liger_kernel": self.use_liger_kernel,
            "activation_offloading": self.activation_offloading,
        }

    def describe(self) -> str:
        """One log line: what runs, so a user reading train.log knows which path was taken."""
        if self.packing:
            keeps_apart = {
                "flash_attention_2": "FlashAttention-2 varlen",
                "sdpa": "sdpa with a block-diagonal mask from position_ids",
                "flex_attention": "FlexAttention's block mask",
            }.get(self.attention, self.attention)
            packing = f"packed rows, padding-free ({keeps_apart} keeps sequences apart)"
        else:
            packing = "one sequence per row, padded to the longest in the batch"
        return (
            f"fast path: attention {self.attention}; {packing}; Liger kernels "
            f"{'on (RMSNorm, RoPE, SwiGLU)' if self.use_liger_kernel else 'off'}; activation offloading "
            f"{'on' if self.activation_offloading else 'off'}"
        )


def attention(requested: str, on_gpu: bool) -> str:
    """``model.attn_implementation``; ``auto``: FlashAttention-2 on a GPU where flash-attn is installed,
    else PyTorch's sdpa. (Under context parallelism ``load_config`` has already made ``auto`` sdpa.)"""
    if requested != "auto":
        return requested
    flash = on_gpu and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def flash_attention_available(implementation: str) -> bool:
    """Whether transformers itself finds the package ``flash_attention_<n>`` needs, by its own check (the
    distribution, its version, a device: modeling_flash_attention_utils.py:98), which a bare import of
    ``flash_attn`` does not make: an old flash-attn imports and is still refused there."""
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX

    version = implementation.removeprefix("flash_attention_")
    entry = FLASH_ATTENTION_COMPATIBILITY_MATRIX.get(int(version)) if version.isdigit() else None
    return entry is not None and bool(entry["general_availability_check"]())


def resolve(
    training: TrainingConfig, stage: str, attention: str, on_gpu: bool, context_parallel: int = 1
) -> FastPath:
    """The switches with ``auto`` decided for a device (a GPU or not), nothing checked: what a run there
    uses, and what the planner counts (train/plan/fit.py). Context parallelism keeps rows unpacked."""
    packing, liger = switch(training, "packing"), switch(training, "use_liger_kernel")
    installed = importlib.util.find_spec("liger_kernel") is not None
    return FastPath(
        packing=packing == "true"
        or (packing == "auto" and on_gpu and stage == "sft" and context_parallel == 1),
        use_liger_kernel=liger == "true" or (liger == "auto" and on_gpu and installed),
        activation_offloading=bool(training.activation_offloading),
        attention=attention,
    )


def fast_path(
    training: TrainingConfig, stage: str, attention: str, on_gpu: bool, context_parallel: int = 1
) -> FastPath:
    """``resolve`` for this device, refusing what cannot run here (ConfigError naming the key and the
    fix). ``attention`` is what the model computes with (``attention`` above). The switches' values and
    packing a preference stage were checked as the config loaded (``train.config.switch_problems``)."""
    problems = []
    if context_parallel > 1 and not on_gpu:
        problems.append(
            f"launch.cp_size={context_parallel}: torch's context parallelism shards SDPA's CUDA kernels; on "
            "a CPU each process would attend within its own part of the sequence only; use launch.cp_size=1"
        )
    liger = switch(training, "use_liger_kernel")
    if liger == "true" and not on_gpu:
        problems.append(
            "training.use_liger_kernel=true: Liger's kernels are Triton kernels for a CUDA GPU and this "
            "machine has none; use training.use_liger_kernel=auto (on where they run) or false"
        )
    elif liger == "true" and importlib.util.find_spec("liger_kernel") is None:
        problems.append(
            f"training.use_liger_kernel=true: liger-kernel is not installed; pip install '{LIGER}' "
            "(or pip install -e '.[gpu]'), or use training.use_liger_kernel=auto"
        )
    if attention.startswith("flash_attention") and not flash_attention_available(attention):
        # transformers 5.25 would not fail but fetch kernels-community/flash-attn from the Hub in its place
        # (modeling_utils.py:1778-1795, whatever use_kernels says): unpinned code, or a failed load offline
        problems.append(
            f"model.attn_implementation={attention}: no flash-attn package that transformers accepts for "
            "it is installed here (flash-attn >= 2.3.3 for flash_attention_2); install it, or use "
            "model.attn_implementation=sdpa"
        )
    if training.activation_offloading and not on_gpu:
        problems.append(
            "training.activation_offloading=true: TRL offloads activations with CUDA streams and this "
            "machine has no CUDA GPU; remove it (use it for long context on a GPU)"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return resolve(training, stage, attention, on_gpu, context_parallel)
