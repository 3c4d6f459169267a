"""Mixtures (data.sources): exact counts per source, seeded and the same on every preparation, repetition
only when asked, a new weight re-mixes cached encodings, held-out groups per source kept out of training."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
from conftest import REPO, SAMPLE, run_train

import data.prepare as prepare_module
from data import DataError, prepare_dataset, prepare_from_config
from data.config import DataConfig, SourceConfig
from data.prepare import mixture_counts, rows_taken

TREES = REPO / "data" / "samples" / "oasst_trees_sample.jsonl"
MESSAGES = REPO / "data" / "samples" / "oasst_messages_sample.jsonl"  # the same 5 trees, flat
PAIRS = REPO / "data" / "samples" / "preference_sample.jsonl"
EOT_ID = 128009


def mixture(tmp_path, *sources: SourceConfig, **settings) -> DataConfig:
    return DataConfig(name="mix", num_proc=1, cache_dir=str(tmp_path), sources=list(sources), **settings)


def sample(**weight) -> SourceConfig:
    return SourceConfig(path=str(SAMPLE), format="messages", **weight)


def trees(**weight) -> SourceConfig:
    return SourceConfig(path=str(TREES), format="oasst_trees", threads="all", **weight)


def rows(dataset) -> Counter:
    return Counter(tuple(ids) for ids in dataset["input_ids"])


def taken_from(mixed, source) -> int:
    """How many rows of ``mixed`` are rows of ``source`` (the samples share no conversation)."""
    mine = rows(source)
    return sum(count for row, count in rows(mixed).items() if row in mine)


# ── the rule: mixture_counts ──────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    ("weights", "available", "counts"),
    [
        # fractions only: the largest mixture no source without repeat needs twice; largest remainder
        ([{"fraction": 0.3}, {"fraction": 0.7}], [100, 100], [43, 99]),  # min(333.3, 142.9) = 142
        ([{"fraction": 0.5}, {"fraction": 0.5}], [10, 1000], [10, 10]),
        # a source that repeats bounds nothing, unless every one does
        ([{"fraction": 0.5}, {"fraction": 0.5, "repeat": True}], [10, 4], [10, 10]),
        ([{"fraction": 0.25, "repeat": True}, {"fraction": 0.75, "repeat": True}], [10, 6], [2, 6]),
        # fractions beside fixed sources: round(R / (1 - F))
        ([{}, {"fraction": 0.2, "repeat": True}], [120, 6], [120, 30]),
        ([{"rows": 50}, {"fraction": 0.5}], [60, 70], [50, 50]),
        # counts, and epochs of a small source
        ([{"rows": 50}, {"rows": 10, "repeat": True}], [100, 4], [50, 10]),
    ],
)  # fmt: skip
def test_weights_give_exact_counts(weights, available, counts):
    sources = [SourceConfig(path=f"s{i}", format="messages", **w) for i, w in enumerate(weights)]
    assert mixture_counts(sources, available) == counts
    assert sum(counts) == sum(mixture_counts(sources, available))


def test_the_mixed_size_rounds_half_up_and_the_remainder_goes_to_the_earlier_source():
    sources = [SourceConfig(path="a", format="messages", rows=7)] + [
        SourceConfig(path=p, format="messages", fraction=0.3) for p in "bc"
    ]
    # 7 / 0.4 = 17.5 → 18 rows; 11 to share at 0.3 : 0.3 → 5.5 each → 6 to the first, 5 to the second
    assert mixture_counts(sources, [100, 100, 100]) == [7, 6, 5]


@pytest.mark.parametrize(
    ("weights", "available", "message"),
    [
        (
            [{"rows": 200}, {}],
            [100, 5],
            r"data.sources\[0\] \(s0\): rows 200 asks for 200 rows, but it has 100 ",
        ),
        (
            [{}, {"fraction": 0.5}],
            [100, 30],
            r"data.sources\[1\] \(s1\): fraction 0.5 asks for 100 rows, .* set ",
        ),
        (
            [{"rows": 3, "repeat": True}, {}],
            [0, 5],
            r"asks for 3 rows, but it has 0 training rows .*; give it data",
        ),
    ],
)
def test_a_source_asked_for_more_than_it_has_is_refused_unless_it_repeats(weights, available, message):
    sources = [SourceConfig(path=f"s{i}", format="messages", **w) for i, w in enumerate(weights)]
    with pytest.raises(DataError, match=message):
        mixture_counts(sources, available)


def test_repetition_is_whole_passes_then_a_seeded_sample():
    indices, passes = rows_taken(4, 10, random.Random(0))
    assert passes == 2 and indices[:8] == [0, 1, 2, 3] * 2 and len(set(indices[8:])) == 2
    indices, passes = rows_taken(10, 4, random.Random(0))
    assert passes == 0 and len(set(indices)) == 4 and indices == sorted(indices)
    assert rows_taken(10, 4, random.Random(0)) == rows_taken(10, 4, random.Random(0))


@pytest.mark.parametrize(
    ("sources", "settings", "message"),
    [
        (
            [sample(fraction=0.3), trees(fraction=0.6)],
            {},
            "data.sources: fractions sum to 0.9; when every source",
        ),
        (
            [sample(), trees(fraction=1.0)],
            {},
            "fractions sum to 1, leaving nothing for the sources with rows",
        ),
        ([sample(fraction=0.5, rows=3), trees()], {}, r"data.sources\[0\]: both fraction and rows"),
        (
            [sample(), trees(repeat=True)],
            {},
            r"data.sources\[1\].repeat: a source without a weight is taken once",
        ),
        ([sample(rows=0), trees()], {}, r"data.sources\[0\].rows: 0; a number of rows, at least 1"),
        ([sample()], {"path": str(SAMPLE)}, "data.path and data.sources are both set"),
        ([], {}, "data.path: no data; set data.path"),
    ],
)
def test_invalid_mixtures_are_refused_before_any_source_is_read(
    tmp_path, tokenizer, monkeypatch, sources, settings, message
):
    monkeypatch.setattr(prepare_module, "load_conversations", lambda *a, **k: pytest.fail("read a source"))
    with pytest.raises(DataError, match=message):
        prepare_from_config(mixture(tmp_path, *sources, **settings), tokenizer, max_length=512)


# ── prepared mixtures ───────────────────────────────────────────────────────────────────
def test_each_source_gives_exactly_its_count_and_the_summary_says_so(tmp_path, tokenizer):
    config = mixture(tmp_path, sample(), trees(fraction=0.2, repeat=True))
    mixed, evaluated, summary = prepare_from_config(config, tokenizer, max_length=512, seed=3)
    whole, _ = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=512, cache_dir=tmp_path)
    threads, _ = prepare_dataset(
        TREES, "oasst_trees", tokenizer, max_length=512, threads="all", cache_dir=tmp_path
    )
    assert evaluated is None and len(mixed) == 158  # 126 whole are 80%: 157.5, rounded half up
    assert taken_from(mixed, whole) == 126 and taken_from(mixed, threads) == 32
    assert rows(mixed) & rows(whole) == rows(whole)  # every row of the unweighted source, once
    assert (
        max(count for row, count in rows(mixed).items() if row in rows(threads)) == 3
    )  # 11 threads, 31 rows
    assert mixed.column_names == ["input_ids", "assistant_masks"]
    lines = str(summary).splitlines()
    assert lines[0] == "mixture of 2 sources: 158 training rows (seed 3)"
    assert lines[1] == f"  {SAMPLE} (all): 126 read, 0 dropped, 126 kept, 0 held out, 126 taken"
    assert lines[2] == (
        f"  {TREES} (fraction 0.2, repeat): 14 read, 3 dropped, 11 kept, 0 held out, 32 taken "
        "(2 whole passes + 10)"
    )
    assert summary.rows == 158 and [share.taken for share in summary.shares] == [126, 32]


def test_without_repeat_no_row_is_taken_twice(tmp_path, tokenizer):
    config = mixture(tmp_path, sample(fraction=0.7), trees(fraction=0.3))
    mixed, _, summary = prepare_from_config(config, tokenizer, max_length=512)
    # the 11 threads bound it: 11 / 0.3 = 36.7 → 36 rows; 25.2 and 10.8 → 25 and 10, the larger remainder's +1
    assert [share.taken for share in summary.shares] == [25, 11]
    assert len(mixed) == 36 and max(rows(mixed).values()) == 1


def test_the_mixture_is_seeded_and_independent_of_the_order_of_the_list(tmp_path, tokenizer):
    def prepared(*sources, seed=1):
        return prepare_from_config(mixture(tmp_path, *sources), tokenizer, max_length=512, seed=seed)[0]

    first = prepared(sample(fraction=0.5), trees(fraction=0.5, repeat=True))
    assert prepared(sample(fraction=0.5), trees(fraction=0.5, repeat=True))["input_ids"] == first["input_ids"]
    assert rows(prepared(trees(fraction=0.5, repeat=True), sample(fraction=0.5))) == rows(first)
    assert rows(prepared(sample(fraction=0.5), trees(fraction=0.5, repeat=True), seed=2)) != rows(first)


def test_a_new_weight_remixes_the_cached_encodings_without_encoding_again(
    tmp_path, tokenizer, monkeypatch, caplog
):
    prepare_from_config(
        mixture(tmp_path, sample(), trees(fraction=0.2, repeat=True)), tokenizer, max_length=512
    )
    entries = sorted(path.name for path in tmp_path.iterdir())
    monkeypatch.setattr(prepare_module, "encode_conversations", lambda *a, **k: pytest.fail("encoded again"))
    caplog.set_level(logging.INFO)
    mixed, _, summary = prepare_from_config(
        mixture(tmp_path, sample(rows=40), trees(fraction=0.2)), tokenizer, max_length=512
    )
    assert [share.taken for share in summary.shares] == [40, 10] and len(mixed) == 50
    loaded = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared data from the cache")
    ]
    assert len(loaded) == 2 and sorted(path.name for path in tmp_path.iterdir()) == entries


def test_each_source_holds_out_its_own_groups_and_none_is_trained_on(tmp_path, tokenizer):
    """The trees and the flat messages sample hold the same 5 trees: a tree held out by one source is held
    out of the other too, so no thread of an evaluated tree is trained on from either."""
    config = mixture(
        tmp_path,
        SourceConfig(path=str(TREES), format="oasst_trees", threads="all", eval_split=1),
        SourceConfig(path=str(MESSAGES), format="oasst_messages", eval_split=1),
        sample(fraction=0.5, eval_split=0.05),
    )
    mixed, evaluated, summary = prepare_from_config(config, tokenizer, max_length=2048, seed=7)
    assert not set(first_turns(mixed)) & set(first_turns(evaluated))
    held = [share.held_out for share in summary.shares]
    assert held[2] == 6 and held[0] >= 1 and held[1] >= 1 and len(evaluated) == sum(held)
    assert "held out for evaluation" in str(summary)
    again = prepare_from_config(config, tokenizer, max_length=2048, seed=7)
    assert again[0]["input_ids"] == mixed["input_ids"] and again[1]["input_ids"] == evaluated["input_ids"]


def first_turns(dataset) -> list[tuple[int, ...]]:
    """Each row's tokens up to the end of its first user turn: its conversation group."""
    return [tuple(ids[: ids.index(EOT_ID, ids.index(EOT_ID) + 1) + 1]) for ids in dataset["input_ids"]]


def test_a_data_default_is_each_sources_setting_unless_it_has_its_own(tmp_path, tokenizer):
    config = mixture(tmp_path, sample(), trees(fraction=0.2, repeat=True), eval_split=1)
    _, evaluated, summary = prepare_from_config(config, tokenizer, max_length=512)
    assert [share.held_out for share in summary.shares][0] == 1 and len(evaluated) > 1
    config = mixture(tmp_path, sample(), SourceConfig(path=str(TREES), format="oasst_trees", rows=4))
    assert len(prepare_from_config(config, tokenizer, max_length=512)[0]) == 130  # threads=best: 4 rows


def test_preference_sources_mix_too(tmp_path, tokenizer):
    config = mixture(
        tmp_path,
        SourceConfig(path=str(PAIRS), format="preference"),
        SourceConfig(path=str(TREES), format="oasst_trees", fraction=0.2, repeat=True),
    )
    mixed, _, summary = prepare_from_config(config, tokenizer, max_length=1024, objective="dpo")
    assert len(mixed) == 50 and [share.taken for share in summary.shares] == [40, 10]
    assert mixed.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]


@pytest.mark.slow  # ~25 s here: a real training process
def test_train_runs_on_the_shipped_mixture(tmp_path):
    """Without the held-out evaluation (data.eval_split=0): the 126 chats whole, and 32 tree threads."""
    result = run_train(
        "data=mixture_sample", "training.max_steps=2", f"data.cache_dir={tmp_path}/c", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = next((tmp_path / "outputs").rglob("train.log")).read_text()
    assert "data: mixture of 2 sources: 158 training rows (seed 42)" in log
    assert (
        "(fraction 0.2, repeat): 14 read, 3 dropped, 11 kept, 0 held out, 32 taken (2 whole passes + 10)"
        in log
    )


def test_training_validation_checks_each_source(tmp_path):
    from train.config import ConfigError, compose_config, load_config

    config = load_config(compose_config(["data=mixture_sample"]))
    assert [source.fraction for source in config.data.sources] == [None, 0.2]
    overrides = [
        "data=mixture_sample", "stage=dpo", f"data.sources.1.path={tmp_path}/absent/*.jsonl",
        "data.eval_split=0", "data.sources.0.eval_split=0.1", f"data.path={SAMPLE}",
    ]  # fmt: skip
    with pytest.raises(ConfigError) as error:
        load_config(compose_config(overrides))
    for problem in (
        "data.path and data.sources are both set",
        f"data.sources[1].path: {tmp_path}/absent/*.jsonl is not a file, a directory, a glob that matches",
        "data.sources[0].eval_split: the run evaluates only with data.eval_split set",
        "data.sources[0].format: data=mixture_sample is 'messages', which holds chats, but stage=dpo",
        "data.sources[1].threads: stage=dpo mines pairs at every prompt of a tree; remove it",
    ):
        assert problem in str(error.value)
