"""Sweeps: an Optuna search (hydra/sweeper=optuna) that minimizes the final eval loss, the sweep's table and
picture, and the best checkpoint of each point (training.load_best_model_at_end)."""

from __future__ import annotations

import csv

import pytest
from conftest import run_train
from safetensors.torch import load_file
from test_launch import eval_losses

from train.run.sweep import point_labels

SEARCH = [
    "+experiment=search_lr_rank",
    "hydra.sweeper.n_trials=3",
    "training.report_to=[]",
    "data.eval_split=2",  # two held-out conversations: one eval batch
    "samples.count=0",  # no generations (tests/test_samples.py has them)
    "training.max_steps=2",
    "training.eval_steps=1",
    "training.save_steps=1",
    "training.load_best_model_at_end=true",  # metric_for_best_model: transformers' default, the eval loss
]


@pytest.mark.slow
def test_an_optuna_search_minimizes_the_final_eval_loss_and_keeps_each_best_checkpoint(tmp_path):
    import optuna

    result = run_train(*SEARCH, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path, evaluate=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["point"] for row in rows] == ["0", "1", "2"]
    study = optuna.load_study(study_name="search_lr_rank", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 3
    for row, trial in zip(rows, study.trials, strict=True):
        run_dir = tmp_path / row["point"]
        evaluated = eval_losses(run_dir)
        assert sorted(evaluated) == [1, 2] and row["status"] == "finished"
        # what the run returned, what Optuna was told, and what sweep.csv ranks by: the loss at the end
        assert trial.value == pytest.approx(evaluated[2]) == pytest.approx(float(row["eval_loss"]))
        overrides = row["overrides"].split()
        assert f"method.r={trial.params['method.r']}" in overrides
        # the best checkpoint's metric, and its adapter is the one the run leaves
        best_step = min(evaluated, key=evaluated.get)
        assert float(row["best_metric"]) == pytest.approx(evaluated[best_step])
        best = load_file(run_dir / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
        final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)
    best_value = min(float(row["eval_loss"]) for row in rows)
    assert study.best_value == pytest.approx(best_value)
    assert f"best_value: {study.best_value}" in (tmp_path / "optimization_results.yaml").read_text()
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_an_optuna_search_without_held_out_data_is_refused_before_training(tmp_path):
    result = run_train("+experiment=search_lr_rank", "data.eval_split=0", f"hydra.sweep.dir={tmp_path}",
                       cwd=tmp_path, evaluate=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    message = "hydra/sweeper=optuna minimizes the final eval loss, and this run holds out no data"
    assert message in result.stderr
    assert not (tmp_path / "0" / "checkpoints").exists()


def test_sweep_png_labels_points_by_what_differs_between_them():
    rows = [
        {"point": 0, "overrides": "training.learning_rate=0.000561151 method.r=8 training.max_steps=2"},
        {"point": 1, "overrides": "training.learning_rate=0.0054 method.r=16 training.max_steps=2"},
    ]
    assert point_labels(rows) == [
        "0: training.learning_rate=0.000561 method.r=8",
        "1: training.learning_rate=0.0054 method.r=16",
    ]
