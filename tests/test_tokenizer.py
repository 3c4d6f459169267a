"""The Llama 3.1 tokenizer: ids, special tokens, equality with Meta's reference, caching, local paths."""

from __future__ import annotations

import random

import pytest
from conftest import meta_base_checkpoint
from transformers import AutoTokenizer

from data import load_tokenizer
from data.tokenizer import CHAT_TEMPLATE_FILE, CHAT_TEMPLATES, llama31_special_tokens, stop_token_ids

MULTILINGUAL = [
    "Hello world",
    "Grüß Gott! Wie geht's dir heute? Ça va très bien, merci.",
    "¿Dónde está la biblioteca? A biblioteca fica ao lado da praça.",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "สวัสดีครับ วันนี้อากาศดีมาก",
    "def f(x):\n\treturn x ** 2  # 12345678\n\n\n   trailing   ",
    "Numbers 3.14159 and 1,000,000; emoji 🦙🔥 and CJK 羊驼.",
    "I'm sure they'll've done it... 'S 'T 'RE",
]


def test_hello_world_ids(tokenizer):
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    # Like Meta's checkpoints' tokenizer.json, the default prepends <|begin_of_text|>.
    assert tokenizer("Hello world").input_ids == [128000, 9906, 1917]


def test_vocabulary_and_special_token_ids(tokenizer):
    assert len(tokenizer) == 128_256
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    specials = llama31_special_tokens()
    assert len(specials) == 256 == len(set(specials))
    assert tokenizer.convert_tokens_to_ids(specials) == list(range(128000, 128256))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        128000,
        128009,
        128004,
    )


def test_chat_template_is_the_official_one(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE_FILE.read_text()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_same_ids_as_meta_and_round_trip(tokenizer, meta_tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids) == text


def test_same_ids_as_meta_on_random_text(tokenizer, meta_tokenizer):
    """Seeded random strings over scripts, digits, punctuation and whitespace runs."""
    alphabet = "abcXYZ éüßçñ ñãõ àè अआकखग् กขคงจ 0123456789 .,;:!?'\"-_()[]{}<>|/\\@#$%^&*~`+= \t\n\r😀🦙羊"
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert tokenizer.encode(text, add_special_tokens=False) == meta_tokenizer.encode(
            text, bos=False, eos=False
        )


def test_special_token_text_can_be_encoded_as_text(tokenizer, meta_tokenizer):
    text = "user wrote <|eot_id|> and <|start_header_id|>"
    as_text = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert as_text == meta_tokenizer.encode(text, bos=False, eos=False)
    assert 128009 not in as_text and 128006 not in as_text


def test_conversion_is_cached(tmp_path, monkeypatch):
    first = load_tokenizer(cache_dir=tmp_path)
    cached = list(tmp_path.glob("*/tokenizer.json"))
    assert len(cached) == 1
    # The second start must read the cache: make conversion impossible and load again.
    import data.tokenizer as module

    monkeypatch.setattr(
        module, "_convert", lambda *a: pytest.fail("converted again instead of using the cache")
    )
    second = load_tokenizer(cache_dir=tmp_path)
    assert second.encode(MULTILINGUAL[1]) == first.encode(MULTILINGUAL[1])
    assert second.chat_template == first.chat_template
    from data.cache import tokenizer_fingerprint

    # the prepared datasets' cache key: a first run (just converted) keys the entry later runs read
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    assert (second.bos_token_id, second.eos_token_id, second.pad_token_id) == (128000, 128009, 128004)


def test_local_tokenizer_directory(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    local = load_tokenizer(tmp_path)
    assert local.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert local.chat_template == tokenizer.chat_template


def test_a_base_checkpoint_tokenizer_ends_with_eot(tokenizer, tmp_path):
    """Meta's base tokenizer ends text with <|end_of_text|>; the Instruct format we train ends turns with
    <|eot_id|>, and so must the tokenizer every run saves."""
    base = meta_base_checkpoint(tmp_path, tokenizer)
    assert AutoTokenizer.from_pretrained(base).eos_token == "<|end_of_text|>"
    local = load_tokenizer(base)
    assert (local.eos_token, local.eos_token_id, local.pad_token_id) == ("<|eot_id|>", 128009, 128004)
    assert local.chat_template == tokenizer.chat_template
    assert stop_token_ids(local) == [128001, 128008, 128009]


def test_missing_local_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_each_chat_format_attaches_its_official_template(tokenizer, tokenizer32, tmp_path):
    """Llama 3.2 (1B, 3B) has its own template on the same tokenizer; a checkpoint's tokenizer carries the
    format the run trains, whatever template it shipped."""
    assert tokenizer32.chat_template == CHAT_TEMPLATES["llama3.2"].read_text() != tokenizer.chat_template
    assert tokenizer32.encode(MULTILINGUAL[1]) == tokenizer.encode(MULTILINGUAL[1])
    assert tokenizer32.convert_tokens_to_ids(["<|eot_id|>", "<|python_tag|>"]) == [128009, 128010]
    tokenizer.save_pretrained(tmp_path)  # a 3.1 Instruct checkpoint's tokenizer
    assert load_tokenizer(tmp_path, chat_format="llama3.2").chat_template == tokenizer32.chat_template
    with pytest.raises(ValueError, match="chat format 'llama3.4': expected one of llama3.1, llama3.2"):
        load_tokenizer(chat_format="llama3.4")
