"""GGUF export: the file llama.cpp loads holds the merged model, Llama 3's tokenizer and chat template, and
read back by transformers' GGUF loader it computes what the merged model computes."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO
from test_config import composed
from test_export import trained_run

import train.export as export_module
from data import encode_chat, load_conversations
from data.tokenizer import EOT, STOP_TOKENS
from train.config import load_config
from train.export import export_gguf, main
from train.model.gguf import (
    EOM,
    LLAMA_BPE_HASH,
    interleave_rotary_halves,
    pre_tokenizer_hash,
    rope_freqs,
    write_gguf,
)
from train.run.outputs import save_resolved_config

TYPES = ("f16", "bf16", "q8_0")
GGML_TYPE = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
# max |GGUF logits - merged logits| / max |merged logits| over the sample's last chat (521 tokens, every
# position, all 128,256 logits) on the tiny LoRA run, measured: f16 1.8e-3, bf16 1.4e-2, q8_0 5.1e-2 (tied
# f16 1.7e-3); the bounds are about 3x that. Rounding alone makes the gap: the loader returns every weight as
# the merged one rounded to the type, exactly (relative RMS 2.1e-4, 1.7e-3, 5.3e-3), and the mean logit
# errors follow it (0.12%, 0.91%, 2.9% of the mean |logit|), amplified by the random tiny model.
TOLERANCE = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 0.15}


@pytest.fixture(scope="module", autouse=True)
def each_file_parsed_once():
    """transformers' GGUF loader parses a file twice (its config, then its tensors: ``load_gguf_checkpoint``
    in modeling_gguf_pytorch_utils.py), and gguf's reader takes ~9 s here over this tokenizer's 128,256
    tokens and 280,147 merges each time: the same reader (gguf's own, read-only) for a file of the same
    path, size and modification time. Only the suite's time changes (test_gguf.py 182 s -> 123 s)."""
    readers = {}
    read = gguf.GGUFReader

    def once(path, *args, **kwargs):
        stat = os.stat(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = read(path, *args, **kwargs)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", once)
        yield
    readers.clear()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer) -> Path:
    """A finished tiny LoRA run (3 steps), exported by the command line's ``main`` with ``format=gguf``
    alone: the adapter is merged into ``merged/`` on the way, then ``gguf/model-f16.gguf`` written."""
    run_dir = tmp_path_factory.mktemp("gguf_lora")
    trained_run(run_dir, tokenizer, "lora")
    assert main([f"run={run_dir}", "format=gguf"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def lora_gguf(lora_run):
    """``lora_gguf(type)``: the run's GGUF file of ``type``, written once."""

    def file(type: str) -> Path:
        path = lora_run / "gguf" / f"model-{type}.gguf"
        return path if path.is_file() else export_gguf(lora_run, type=type)

    return file


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tokenizer) -> Path:
    """A finished tiny full run (1 step) with tied input/output embeddings, as Llama 3.2 1B/3B, exported to
    f16 GGUF (``<run>/gguf/model-f16.gguf``) by the command line's ``main``."""
    run_dir = tmp_path_factory.mktemp("gguf_tied")
    trained_run(run_dir, tokenizer, "full", "model.tie_word_embeddings=true", "training.max_steps=1")
    assert main([f"run={run_dir}", "format=gguf", "type=f16"]) == 0
    return run_dir


def metadata(path: Path) -> tuple[dict, dict]:
    """``(metadata, {tensor name: ggml type})`` by transformers' GGUF reader (the vocabulary in full)."""
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    values, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    return values, GgufHeader.from_file(str(path)).ggml_types


def sample_chat_ids(tokenizer) -> torch.Tensor:
    """The shipped sample's last conversation (multi-turn, Hindi), as ``data.encode_chat`` encodes it."""
    config = load_config(composed()).data
    chat = load_conversations(config.path, config.format).conversations[-1]
    return torch.tensor([encode_chat(chat, tokenizer)["input_ids"]])


# ---- the command line --------------------------------------------------------------------------------------


def run_dir_without_weights(tmp_path: Path, method: str) -> Path:
    cfg = composed(f"method={method}")
    cfg.output_dir = str(tmp_path)
    save_resolved_config(cfg, tmp_path)
    return tmp_path


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any merge (the only weight loading before the GGUF pass) fails the test."""
    monkeypatch.setattr(export_module, "merged_model", lambda *_: pytest.fail("export loaded weights"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["format=gguf", "type=q4_k"], "type=q4_k: expected one of f16, bf16, q8_0"),
        (["type=q8_0"], "type=q8_0 sets the GGUF type; add format=gguf"),
        (["format=onnx"], "format=onnx: expected safetensors (the default) or gguf"),
        (["format=gguf", "typo=f16"], "usage: python -m train.export"),
    ],
)
def test_export_refuses_bad_arguments_before_reading_the_run(
    tmp_path, capsys, no_weights_load, arguments, message
):
    assert main([f"run={tmp_path}", *arguments]) == 2  # tmp_path is no run: the arguments are checked first
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("method", "missing"), [("full", "model: no safetensors weights"),
                                                 ("lora", "adapter: no adapter_config.json")])  # fmt: skip
def test_gguf_export_refuses_a_run_without_weights(tmp_path, capsys, no_weights_load, method, missing):
    run_dir = run_dir_without_weights(tmp_path, method)
    assert main([f"run={run_dir}", "format=gguf"]) == 2
    error = capsys.readouterr().err
    assert f"error: {run_dir}/{missing}" in error
    assert not (run_dir / "gguf").exists()


@pytest.mark.slow
def test_gguf_export_merges_once_and_again_when_the_adapter_is_newer(lora_run, lora_gguf, tmp_path):
    merged = lora_run / "merged" / "model.safetensors"
    written = merged.stat().st_mtime_ns
    assert lora_gguf("f16").is_file()
    export_gguf(lora_run, tmp_path, "q8_0")
    assert merged.stat().st_mtime_ns == written  # the merge the first export made is reused
    adapter = lora_run / "adapter" / "adapter_model.safetensors"
    os.utime(adapter, ns=(written + 10**9, written + 10**9))  # as if the run had saved its adapter again
    assert export_gguf(lora_run, tmp_path, "q8_0") == tmp_path / "model-q8_0.gguf"
    assert merged.stat().st_mtime_ns > written  # merged again, from the newer adapter


@pytest.mark.slow
def test_gguf_writer_holds_one_converted_tensor_at_a_time(lora_run, tmp_path, monkeypatch):
    """Streaming: each tensor's float32 copy and its converted array are gone before the next is read."""
    held = []
    quantize = gguf.quants.quantize

    def tracked(data, qtype):
        gc.collect()
        assert not [ref for ref in held if ref() is not None], "an earlier tensor is still held"
        converted = quantize(data, qtype)
        held.extend([weakref.ref(data), weakref.ref(converted)])
        return converted

    monkeypatch.setattr(gguf.quants, "quantize", tracked)
    write_gguf(lora_run / "merged", tmp_path / "model.gguf", "q8_0")
    assert len(held) == 2 * (2 + 9 * 2 + 1)  # embeddings, output head, 9 per block, final norm


# ---- what the file says ------------------------------------------------------------------------------------


def test_gguf_metadata_is_the_llama3_model_and_tokenizer(lora_run, lora_gguf, tokenizer):
    """Hyper-parameters, vocabulary, merges, special ids and the chat template, as llama.cpp reads them."""
    path = lora_gguf("f16")
    assert path == lora_run / "gguf" / "model-f16.gguf"
    values, types = metadata(path)
    config = json.loads((lora_run / "merged" / "config.json").read_text())
    assert (
        values["general.architecture"] == "llama"
        and values["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    )
    assert {key.removeprefix("llama."): values[key] for key in values if key.startswith("llama.")} == {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "rope.freq_base": config["rope_parameters"]["rope_theta"],
        "attention.layer_norm_rms_epsilon": pytest.approx(config["rms_norm_eps"]),
        "attention.key_length": config["head_dim"], "attention.value_length": config["head_dim"],
        "rope.dimension_count": config["head_dim"], "vocab_size": config["vocab_size"],
    }  # fmt: skip

    # the vocabulary: llama.cpp's byte-level BPE, whose pre-tokenizer it names by this very hash
    assert (values["tokenizer.ggml.model"], values["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert pre_tokenizer_hash(tokenizer) == LLAMA_BPE_HASH
    assert values["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    first_special = tokenizer.bos_token_id  # 128000: the 256 special tokens follow the 128,000 BPE tokens
    assert values["tokenizer.ggml.token_type"] == [gguf.TokenType.NORMAL] * first_special + [
        gguf.TokenType.CONTROL
    ] * (len(tokenizer) - first_special)
    merges = json.loads((lora_run / "merged" / "tokenizer.json").read_text())["model"]["merges"]
    assert values["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]

    # where generation starts and stops, and the template that renders a chat, exactly the tokenizer's
    ids = {
        name: values[f"tokenizer.ggml.{name}_token_id"] for name in ("bos", "eos", "eot", "eom", "padding")
    }
    assert ids == {"bos": 128000, "eos": 128009, "eot": 128009, "eom": 128008, "padding": 128004}
    assert ids["eos"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOT)
    assert ids["eom"] == tokenizer.convert_tokens_to_ids(EOM)
    # <|end_of_text|> has no key of its own: llama.cpp's vocabulary adds it to the end-of-generation set by
    # its text (llama-vocab.cpp), so the token list must spell all three stop tokens, as CONTROL tokens
    for token in STOP_TOKENS:
        index = values["tokenizer.ggml.tokens"].index(token)
        assert values["tokenizer.ggml.token_type"][index] == gguf.TokenType.CONTROL
    assert values["tokenizer.ggml.add_bos_token"] is True
    assert values["tokenizer.chat_template"] == tokenizer.chat_template
    assert values["tokenizer.chat_template"] == (lora_run / "merged" / "chat_template.jinja").read_text()

    # the tensors: rope_freqs and the untied output head beside the blocks, norms in F32
    layers = config["num_hidden_layers"]
    assert len(types) == 2 + 9 * layers + 2
    assert {"rope_freqs.weight", "token_embd.weight", "output_norm.weight", "output.weight"} <= set(types)


@pytest.mark.parametrize("type", TYPES)
def test_gguf_tensor_types(lora_gguf, type):
    """Matrices in the chosen type, 1-D tensors (norms, rope_freqs) in F32, as llama.cpp's converter does."""
    values, types = metadata(lora_gguf(type))
    assert values["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[type]
    for name, ggml_type in types.items():
        vector = name.endswith("_norm.weight") or name == "rope_freqs.weight"
        assert ggml_type == (gguf.GGMLQuantizationType.F32 if vector else GGML_TYPE[type]), name


def test_rope_freqs_are_transformers_llama3_scaling(lora_gguf, lora_run):
    """llama.cpp divides each rotary frequency by ``rope_freqs`` (ggml's rope, ``freq_factors``): the file's
    divisors turn the default frequencies into exactly the ones transformers' llama3 RoPE computes."""
    from transformers import AutoConfig
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(lora_run / "merged")
    stored = load_gguf_state_dict(GgufHeader.from_file(str(lora_gguf("f16"))))["rope_freqs.weight"][...]
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    llama3 = LlamaRotaryEmbedding(config).inv_freq
    torch.testing.assert_close(default / stored, llama3, rtol=1e-6, atol=0)
    assert stored.min() == 1 and stored.max() == config.rope_parameters["factor"]  # both ends are reached
    assert torch.equal(stored, torch.from_numpy(rope_freqs(config)))


def test_q_and_k_rows_are_permuted_as_transformers_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, kv_heads, head_dim, hidden = 4, 2, 8, 32
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, rows, groups in [("blk.0.attn_q.weight", heads * head_dim, heads),
                               ("blk.0.attn_k.weight", kv_heads * head_dim, kv_heads)]:  # fmt: skip
        weight = torch.randn(rows, hidden)
        permuted = interleave_rotary_halves(weight, groups)
        assert not torch.equal(permuted, weight)
        # GGML pairs 2i, 2i+1: the first two rows of a head are transformers' rows 0 and d/2
        assert torch.equal(permuted[1], weight[head_dim // 2])
        restored = processor.process(weights=permuted.numpy(), name=name).weights
        assert np.array_equal(restored, weight.numpy())


@pytest.mark.slow
def test_tied_embeddings_write_no_output_head(tied_run):
    values, types = metadata(tied_run / "gguf" / "model-f16.gguf")
    assert "output.weight" not in types and "token_embd.weight" in types
    assert values["tokenizer.ggml.eos_token_id"] == 128009


# ---- read back: what the file computes ---------------------------------------------------------------------


def rounded(weight: torch.Tensor, type: str) -> torch.Tensor:
    """``weight`` as a GGUF of ``type`` holds it: cast (f16, bf16) or quantized and dequantized (q8_0)."""
    if type == "q8_0":
        blocks = gguf.quants.quantize(weight.float().numpy(), GGML_TYPE[type])
        return torch.from_numpy(gguf.quants.dequantize(blocks, GGML_TYPE[type]))
    return weight.to({"f16": torch.float16, "bf16": torch.bfloat16}[type]).float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("type", TYPES)
def test_gguf_computes_what_the_merged_model_does(lora_run, lora_gguf, tokenizer, type):
    """transformers' GGUF loader reads every weight back as the merged one rounded to ``type``, and the
    logits of a real chat match the merged model's within the type's tolerance.

    The loader drops RoPE scaling for Llama files (its config mapping reads ``rope.freq_base`` only, and the
    ``rope_freqs`` tensor maps to no parameter): its model computes plain RoPE. So it is compared twice:
    as loaded, against the merged model without the scaling; and with the merged config's llama3 scaling
    restored, against the merged model itself. The file's ``rope_freqs`` is checked against transformers'
    llama3 frequencies on its own (test_rope_freqs_are_transformers_llama3_scaling).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    loaded = AutoModelForCausalLM.from_pretrained(
        lora_gguf(type).parent, gguf_file=lora_gguf(type).name
    ).eval()
    assert loaded.config.tie_word_embeddings is False
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}  # the loader's
    weights, expected_weights = loaded.state_dict(), merged.state_dict()
    assert weights.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        expected = weight if weight.dim() == 1 else rounded(weight, type)
        assert torch.equal(weights[name], expected), name

    ids = sample_chat_ids(tokenizer)
    restored = LlamaForCausalLM(merged.config).eval()  # the merged config: llama3 scaling
    restored.load_state_dict(weights)
    unscaled_config = copy.deepcopy(merged.config)
    unscaled_config.rope_parameters = dict(loaded.config.rope_parameters)
    unscaled = LlamaForCausalLM(unscaled_config).eval()  # the merged weights, computed with plain RoPE
    unscaled.load_state_dict(expected_weights)
    with torch.no_grad():
        reference = merged(input_ids=ids).logits
        errors = {
            "restored scaling": relative_error(restored(input_ids=ids).logits, reference),
            "as loaded": relative_error(loaded(input_ids=ids).logits, unscaled(input_ids=ids).logits),
        }
        scaling_matters = relative_error(unscaled(input_ids=ids).logits, reference)
    print(f"{type}: max |logit error| / max |logit| {errors}; plain RoPE vs llama3: {scaling_matters:.2e}")
    assert max(errors.values()) < TOLERANCE[type], errors
    assert scaling_matters > TOLERANCE["f16"]  # the chat is long enough for the scaling to show


@pytest.mark.slow
def test_tied_gguf_computes_what_the_run_does(tied_run, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = tied_run / "gguf" / "model-f16.gguf"
    # the command a user types writes the same file (out= elsewhere): the writer is deterministic
    command = ["-m", "train.export", f"run={tied_run}", "format=gguf", "type=f16", f"out={tied_run}/cli"]
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"GGUF written to {tied_run}/cli/model-f16.gguf" in result.stdout
    assert (tied_run / "cli" / "model-f16.gguf").read_bytes() == path.read_bytes()

    trained = AutoModelForCausalLM.from_pretrained(tied_run / "model").eval()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert loaded.config.tie_word_embeddings is True  # no output.weight: the loader ties, as llama.cpp does
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    restored = LlamaForCausalLM(trained.config).eval()
    restored.load_state_dict(loaded.state_dict())
    ids = sample_chat_ids(tokenizer)
    with torch.no_grad():
        error = relative_error(restored(input_ids=ids).logits, trained(input_ids=ids).logits)
    print(f"tied f16: max |logit error| / max |logit| {error:.2e}")
    assert error < TOLERANCE["f16"]


@pytest.mark.slow
def test_gguf_tokenizer_encodes_chats_as_the_run_does(lora_gguf, tokenizer):
    """transformers rebuilds the tokenizer from the file alone (tokens, merges, llama-bpe split, CONTROL
    tokens): it renders and encodes a chat to the ids ``data.encode_chat`` gives."""
    from transformers import AutoTokenizer

    path = lora_gguf("q8_0")
    rebuilt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert rebuilt.chat_template == tokenizer.chat_template
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.pad_token) == (
        "<|begin_of_text|>", EOT, "<|finetune_right_pad_id|>",
    )  # fmt: skip
    config = load_config(composed()).data
    for chat in load_conversations(config.path, config.format).conversations[-3:]:
        text = rebuilt.apply_chat_template(chat, tokenize=False)
        assert rebuilt.encode(text, add_special_tokens=False) == encode_chat(chat, tokenizer)["input_ids"]


@pytest.mark.slow
def test_gguf_reader_reads_the_file(lora_gguf, tokenizer):
    """gguf-py's own reader (what llama.cpp's gguf tools use) finds the keys, the template and the tensors."""
    reader = gguf.GGUFReader(lora_gguf("q8_0"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert [field(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "eom")] == [
        128000, 128009, 128009, 128008,
    ]  # fmt: skip
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
