"""Write a merged Llama checkpoint as one GGUF file, the format llama.cpp and Ollama load.

    python -m train.export run=<run> format=gguf [type=f16|bf16|q8_0] [out=<dir>]

The file is written by the ``gguf`` package (llama.cpp's own gguf-py: ``GGUFWriter``, ``TensorNameMap``,
``quants``, ``BpeVocab``, ``SpecialVocab``), and each choice below is the one llama.cpp's converter makes
for ``LlamaForCausalLM`` (convert_hf_to_gguf.py, ``LlamaModel`` and ``TextModel``):

- Q and K rows are permuted from transformers' rotate-half RoPE layout to GGML's interleaved pairs;
- Llama 3.1's ``llama3`` RoPE scaling becomes a ``rope_freqs`` tensor, one divisor per frequency;
- 1-D tensors (the norms, ``rope_freqs``) are F32, every matrix is ``type`` (a q8_0 row that is not a
  whole number of 32-wide blocks stays F16);
- tied embeddings (Llama 3.2 1B/3B) write no ``output.weight``: llama.cpp reuses ``token_embd``;
- the vocabulary is llama.cpp's byte-level BPE ("gpt2") with the ``llama-bpe`` pre-tokenizer, the 256
  special tokens as CONTROL, the merges, BOS/EOS/EOT/EOM/pad ids and the tokenizer's chat template verbatim.

Tensors stream: the plan comes from the safetensors headers alone, then each tensor is read, converted and
written in turn. Besides the vocabulary, no more than one tensor is held (in float32, plus its converted
copy): a 70B checkpoint's largest, the 128,256 x 8,192 embedding, is 4.2 GB in float32.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedTokenizerBase

# type= -> (the matrices' GGML type, the file type llama.cpp records for it)
GGUF_TYPES = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
DEFAULT_TYPE = "f16"  # what llama.cpp's converter writes by default; every llama.cpp backend runs it
VALUE_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

# llama.cpp names a BPE pre-tokenizer by the hash of the ids its tokenizer gives this text, with BOS
# (convert_hf_to_gguf.py, get_vocab_base_pre: chktxt; "llama-bpe" is meta-llama/Meta-Llama-3-8B's hash).
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````"
    "\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
LLAMA_BPE_HASH = "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"
EOM = "<|eom_id|>"  # ends a turn that calls a tool (Meta's Llama 3.1 model card)


class GGUFError(ValueError):
    """The checkpoint cannot be written as a Llama GGUF: what is wrong with it, and where."""


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, logical shape (transformers' order) and GGML type, and where
    its values come from (``source`` in ``file``; both None for ``rope_freqs``, computed here)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    source: str | None = None
    file: Path | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the array ``gguf.quants.quantize`` returns: bytes per row for a block type."""
        if self.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return self.shape
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def stored_dtype(self) -> np.dtype:
        """float32 or float16 values, else bytes (bf16 too: numpy has no bfloat16)."""
        return np.dtype(VALUE_DTYPES.get(self.qtype, np.uint8))

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * self.stored_dtype.itemsize


def gguf_file_name(type: str) -> str:
    """``model-<type>.gguf``: one file per type, side by side in the output directory."""
    return f"model-{type}.gguf"


def check_type(type: str) -> str:
    """``type`` if it is one this writer produces; else a GGUFError naming the choices."""
    if type not in GGUF_TYPES:
        raise GGUFError(f"type={type}: expected one of {', '.join(GGUF_TYPES)}")
    return type


def safetensors_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's weight files: those its ``model.safetensors.index.json`` lists, or
    ``model.safetensors``. A GGUFError when there are none."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint / name for name in sorted(set(weight_map.values()))]
    if (checkpoint / "model.safetensors").is_file():
        return [checkpoint / "model.safetensors"]
    raise GGUFError(f"{checkpoint}: no model.safetensors or model.safetensors.index.json")


def write_gguf(checkpoint: Path, path: Path, type: str = DEFAULT_TYPE, *, name: str | None = None) -> Path:
    """Write the transformers Llama checkpoint in ``checkpoint`` (safetensors, config.json, tokenizer) to
    ``path`` as a GGUF file of ``type``, tensor by tensor; ``name`` goes to ``general.name``.

    Everything that could refuse (architecture, RoPE scaling, tokenizer, tensor names) is checked before the
    first tensor is read. The file appears at ``path`` only once complete (written beside it, then renamed).
    """
    from transformers import AutoConfig

    qtype, file_type = GGUF_TYPES[check_type(type)]
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    if config.model_type != "llama":
        raise GGUFError(
            f"{checkpoint}/config.json: model_type {config.model_type!r}; this writes Llama models"
        )
    tokenizer = llama3_tokenizer(checkpoint, config.vocab_size)
    frequencies = rope_freqs(config)
    tensors = plan_tensors(checkpoint, config, qtype)
    if frequencies is not None:  # first, as llama.cpp's converter writes it
        tensors.insert(0, PlannedTensor(rope_freqs_name(), frequencies.shape, GGMLQuantizationType.F32))

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_hyperparameters(writer, config, file_type, name or checkpoint.name)
        add_vocabulary(writer, checkpoint, tokenizer, config.vocab_size)
        for tensor in tensors:
            writer.add_tensor_info(
                tensor.name, tensor.stored_shape, tensor.stored_dtype, tensor.nbytes, raw_dtype=tensor.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # the writer takes the data in the order of the infos above: rope_freqs, then file by file
        if frequencies is not None:
            writer.write_tensor_data(frequencies)
        for tensor, data in read_converted(tensors[frequencies is not None :], config):
            assert data.shape == tensor.stored_shape, (tensor.name, data.shape, tensor.stored_shape)
            writer.write_tensor_data(data)
            del data  # before the next tensor is read: one converted tensor at a time
    except BaseException:
        partial.unlink(missing_ok=True)  # no torn file left behind
        raise
    finally:
        writer.close()
    partial.replace(path)
    return path


# ---- hyper-parameters --------------------------------------------------------------------------------------


def add_hyperparameters(
    writer: gguf.GGUFWriter, config: LlamaConfig, file_type: LlamaFileType, name: str
) -> None:
    """The ``general.*`` and ``llama.*`` keys llama.cpp reads for a Llama model."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_freqs_name() -> str:
    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def rope_freqs(config: LlamaConfig) -> np.ndarray | None:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: per rotary frequency, the divisor of its angle (1 for
    high frequencies, ``factor`` for low ones, smoothly in between). None without scaling; a GGUFError for
    a scaling llama.cpp's Llama graph would not read from this tensor.

    Same formula as llama.cpp's converter (``LlamaModel.generate_extra_tensors``), and as Meta's
    ``apply_scaling``; ``original_max_position_embeddings`` is read from the scaling, where transformers
    keeps it (the converter looks for it at the top of config.json and falls back to 8192).
    """
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise GGUFError(f"rope_type {rope_type!r}: the GGUF export writes Llama 3's llama3 scaling or none")
    dim = head_dim(config)
    frequencies = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelengths = 2 * math.pi / frequencies
    smooth = (context / wavelengths - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(
        wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, between)
    )
    return divisors.astype(np.float32)


# ---- tensors -----------------------------------------------------------------------------------------------


def plan_tensors(checkpoint: Path, config: LlamaConfig, qtype: GGMLQuantizationType) -> list[PlannedTensor]:
    """Every weight of the checkpoint under its GGUF name, shape and type, from the safetensors headers
    alone (nothing is read). Tied embeddings write no ``output.weight``; an ``lm_head.weight`` saved beside
    them anyway is the same matrix and is left out. An untied checkpoint without one is refused."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    planned = []
    for file in safetensors_files(checkpoint):
        with safe_open(file, framework="pt") as weights:
            for source in weights.keys():
                tied_head = config.tie_word_embeddings and source == "lm_head.weight"
                if tied_head or source.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFError(f"{file}: tensor {source!r} has no Llama GGUF name")
                shape = tuple(weights.get_slice(source).get_shape())
                planned.append(PlannedTensor(name, shape, tensor_type(name, shape, qtype), source, file))
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if not config.tie_word_embeddings and output not in {tensor.name for tensor in planned}:
        raise GGUFError(f"{checkpoint}: no lm_head.weight, and config.json says tie_word_embeddings false")
    return planned


def tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """F32 for 1-D tensors and norms (llama.cpp computes them in F32), ``qtype`` for matrices, F16 where a
    row is not a whole number of ``qtype``'s blocks (llama.cpp's fallback)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def read_converted(
    tensors: list[PlannedTensor], config: LlamaConfig
) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """``(tensor, data)`` in plan order, each read from its safetensors file only when its turn comes."""
    from safetensors import safe_open

    for file, group in itertools.groupby(tensors, key=lambda tensor: tensor.file):
        with safe_open(file, framework="pt") as weights:
            for tensor in group:
                yield tensor, convert(weights.get_tensor(tensor.source), tensor, config)


def convert(weight: torch.Tensor, tensor: PlannedTensor, config: LlamaConfig) -> np.ndarray:
    """``weight`` (a torch tensor in any float dtype) as GGUF stores ``tensor``: Q and K rows interleaved
    for GGML's RoPE, then cast or quantized to its type by ``gguf.quants``."""
    data = weight.float()
    if tensor.name.endswith(".attn_q.weight"):
        data = interleave_rotary_halves(data, config.num_attention_heads)
    elif tensor.name.endswith(".attn_k.weight"):
        data = interleave_rotary_halves(data, config.num_key_value_heads)
    return gguf.quants.quantize(data.numpy(), tensor.qtype)


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from transformers' RoPE layout (the rotated pairs are dimensions
    ``i`` and ``i + d/2``: ``rotate_half``) to GGML's (pairs ``2i``, ``2i + 1``). llama.cpp's converter
    (``LlamaModel.permute``); transformers' GGUF loader undoes it (``LlamaTensorProcessor``)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


# ---- vocabulary --------------------------------------------------------------------------------------------


def llama3_tokenizer(checkpoint: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, checked to be what the file will claim: Llama 3's BPE (llama.cpp's
    ``llama-bpe`` pre-tokenizer hash), within the model's vocabulary, every added token special, ending a
    turn at ``<|eot_id|>`` and carrying a chat template."""
    from transformers import AutoTokenizer

    from data.tokenizer import EOT, STOP_TOKENS

    if not (checkpoint / "tokenizer.json").is_file():
        raise GGUFError(
            f"{checkpoint}: no tokenizer.json (the export writes the tokenizer beside the weights)"
        )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if pre_tokenizer_hash(tokenizer) != LLAMA_BPE_HASH:
        raise GGUFError(
            f"{checkpoint}: the tokenizer is not Llama 3's BPE (llama.cpp's llama-bpe pre-tokenizer)"
        )
    if len(tokenizer) > vocab_size:
        raise GGUFError(
            f"{checkpoint}: {len(tokenizer)} tokens, but config.json's vocab_size is {vocab_size}"
        )
    if not all(token.special for token in tokenizer.added_tokens_decoder.values()):
        raise GGUFError(f"{checkpoint}: an added token is not special; GGUF would mark it CONTROL")
    missing = [token for token in (*STOP_TOKENS, EOM) if token not in tokenizer.get_vocab()]
    if tokenizer.eos_token != EOT or missing or not tokenizer.chat_template:
        raise GGUFError(
            f"{checkpoint}: expected a Llama 3 Instruct tokenizer (EOS {EOT}, stop tokens "
            f"{', '.join(STOP_TOKENS)}, a chat template); got EOS {tokenizer.eos_token}, "
            f"missing {missing or 'none'}, template {'set' if tokenizer.chat_template else 'none'}"
        )
    return tokenizer


def pre_tokenizer_hash(tokenizer) -> str:
    """What llama.cpp's converter keys the pre-tokenizer on: sha256 of the ids of ``PRE_TOKENIZER_TEXT``."""
    return hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()


def add_vocabulary(writer: gguf.GGUFWriter, checkpoint: Path, tokenizer, vocab_size: int) -> None:
    """The ``tokenizer.*`` keys: tokens and types (``gguf.BpeVocab``; ids past the tokenizer up to
    ``vocab_size`` as ``[PAD<id>]``, UNUSED, as llama.cpp pads), merges, ``add_bos_token`` and the chat
    template (``gguf.SpecialVocab``), and the special ids from the tokenizer itself: BOS, EOS = EOT =
    ``<|eot_id|>``, EOM ``<|eom_id|>``, pad. llama.cpp also stops at ``<|end_of_text|>``, by its text."""
    from data.tokenizer import EOT

    vocabulary = gguf.BpeVocab(checkpoint)
    tokens, types = [], []
    for text, _score, token_type in vocabulary.all_tokens():
        tokens.append(text.decode() if isinstance(text, bytes) else text)
        types.append(token_type)
    tokens += [f"[PAD{index}]" for index in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model(vocabulary.tokenizer_model)
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # gguf warns that the pair template (BOS A BOS B) has an unknown separator; GGUF has no pair template
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(checkpoint, load_merges=True, special_token_types=())
    finally:
        vocab_log.setLevel(level)
    if special.chat_template != tokenizer.chat_template:
        raise GGUFError(f"{checkpoint}: the chat template gguf reads differs from the tokenizer's")
    special.add_to_gguf(writer, quiet=True)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(EOT))
    writer.add_eom_token_id(tokenizer.convert_tokens_to_ids(EOM))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
