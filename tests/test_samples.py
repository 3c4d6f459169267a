"""samples.jsonl's prompts: the exact Llama 3.1 format once TRL's LogCompletionsCallback tokenizes them."""

from __future__ import annotations

from types import SimpleNamespace

from data import encode_chat
from train.samples import prompt_text, sample_prompts, user_prompt_text

CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Wann sage ich „in den Park“?"},
    {"role": "assistant", "content": "Bei einer Bewegung: Ich gehe in den Park."},
    {"role": "user", "content": "Und „im Park“?"},
    {"role": "assistant", "content": "Beim Ort: Ich bin im Park."},
]


def test_a_held_out_chat_becomes_its_opening_turns_token_for_token(tokenizer):
    """TRL tokenizes the prompt text with the tokenizer (which adds <|begin_of_text|>): the ids are the
    chat's own up to its first assistant header, as data.encode_chat wrote them for training."""
    ids = encode_chat(CHAT, tokenizer)["input_ids"]
    text = prompt_text(ids, tokenizer)
    assert text.endswith("in den Park“?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    opening = encode_chat([*CHAT[:2], {"role": "assistant", "content": ""}], tokenizer)["input_ids"][:-1]
    assert tokenizer(text)["input_ids"] == opening == ids[: len(opening)]


def test_configured_prompts_are_one_turn_chats_and_held_out_ones_come_first(tokenizer):
    text = user_prompt_text("Explain LoRA in one sentence.", tokenizer)
    expected = encode_chat(
        [{"role": "user", "content": "Explain LoRA in one sentence."}, {"role": "assistant", "content": ""}],
        tokenizer,
    )["input_ids"][:-1]  # the reply's header, not its end
    assert tokenizer(text)["input_ids"] == expected

    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [encode_chat(CHAT, tokenizer)["input_ids"]] * 3})
    held_out = sample_prompts(SimpleNamespace(prompts=[], count=2, max_new_tokens=8), rows, tokenizer)
    assert held_out == [prompt_text(rows[0]["input_ids"], tokenizer)] * 2
    given = SimpleNamespace(prompts=["Hi"], count=2, max_new_tokens=8)
    assert sample_prompts(given, rows, tokenizer) == [user_prompt_text("Hi", tokenizer)]
