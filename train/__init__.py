"""Fine-tune Llama 3.1 with TRL; ``python -m train`` (train/__main__.py) is the story of a run.

Python runs this file before any ``train.*`` module, so the notes the libraries would print on every command,
which no user can act on, are quieted here, before those libraries are imported. Only these exact notes."""

import logging
import warnings

# bitsandbytes 0.50 (backends/cpu/ops.py:242-255) asks the `kernels` package at import, on CPUs with
# AVX512-BF16, for kernels-community's 4-bit CPU matmul from the Hub, and logs this when it does not get it
# (kernels 0.19 refuses the publisher as unverified, or the Hub is offline); it then uses its own compiled
# CPU kernel, so nothing is wrong. Only CPU 4-bit inference would use that kernel; a GPU never does.
_KERNELS_COMMUNITY_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(_KERNELS_COMMUNITY_NOTE)
)

# transformers 5.24 renamed gradient checkpointing to activation checkpointing on the model; the old names
# still work and warn from transformers.modeling_utils. Our code uses the new names (train/run/trainer.py);
# the callers of the old ones are peft 0.21 (PeftModel.__init__ and prepare_model_for_kbit_training) and TRL
# 1.16 (models/utils.py: disable_gradient_checkpointing, around DPO/KTO's reference pass).
warnings.filterwarnings(
    "ignore",
    message=r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
)
