"""Packing (TRL's bfd): packed sequences must not attend across their boundaries.

On CPU the attention is sdpa: with position_ids that restart at 0 and no attention mask,
transformers builds a block-diagonal causal mask from them. Each sequence's logits in a
packed row must equal that sequence run alone.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import tiny_trainer


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer):
    trainer, _ = tiny_trainer(
        tmp_path_factory.mktemp("packing"), tokenizer, "training.packing=true", "training.max_length=1024"
    )
    row = next(r for r in trainer.train_dataset if len(r["seq_lengths"]) >= 2)
    batch = trainer.data_collator([row])
    model = trainer.model.eval()
    return model, row, batch


def segments(row) -> list[slice]:
    starts = [0]
    for length in row["seq_lengths"]:
        starts.append(starts[-1] + length)
    return [slice(a, b) for a, b in zip(starts, starts[1:], strict=False)]


def test_packed_row_holds_several_whole_sequences_with_their_labels(packed, tokenizer):
    _, row, batch = packed
    assert batch["input_ids"].shape == (1, sum(row["seq_lengths"]))
    for part in segments(row):
        ids = row["input_ids"][part]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
        assert batch["position_ids"][0, part].tolist() == list(range(len(ids)))
        assert row["labels"][part][0] == -100  # BOS is never learned


def test_each_packed_sequence_sees_only_itself(packed):
    model, row, batch = packed
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed_logits = model(**inputs).logits[0]
        for part in segments(row):
            alone = model(input_ids=batch["input_ids"][:, part]).logits[0]
            torch.testing.assert_close(packed_logits[part], alone, atol=1e-4, rtol=1e-4)


def test_without_position_resets_the_second_sequence_would_see_the_first(packed):
    """The control that shows the test above can fail: plain causal attention over the packed row."""
    model, row, batch = packed
    second = segments(row)[1]
    with torch.no_grad():
        causal = model(input_ids=batch["input_ids"]).logits[0, second]
        alone = model(input_ids=batch["input_ids"][:, second]).logits[0]
    assert not torch.allclose(causal, alone, atol=1e-3)
