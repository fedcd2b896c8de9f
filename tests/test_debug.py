"""debug=default|fdr|limit|overfit|profiler compose as the lightning-hydra-template's do, and really run."""

import csv
import json
from pathlib import Path

import pytest
import torch

from mnist_adder.training.train import train

from conftest import compose_config, tiny_data_overrides

DEBUG_CHOICES = ("default", "fdr", "limit", "overfit", "profiler")


def _data_overrides(data_dir: Path) -> list[str]:
    # tiny_mnist's sizes, and nothing about the trainer: the debug choice decides that.
    return [
        *tiny_data_overrides(data_dir),
        "trainer.enable_progress_bar=false",
        "extras.print_config=false",
    ]


@pytest.mark.parametrize("choice", DEBUG_CHOICES)
def test_debug_choice_composes_over_everything(choice, tmp_path):
    # debug comes last in the defaults: it wins over an experiment's trainer settings.
    cfg = compose_config([f"debug={choice}", "experiment=smoke", "trainer=gpu"], tmp_path)
    assert cfg.task_name == "debug"
    assert cfg.trainer.detect_anomaly is True and cfg.trainer.accelerator == "cpu"
    expected = {
        "default": {"max_epochs": 1},
        "fdr": {"fast_dev_run": True},
        "limit": {"max_epochs": 3, "limit_train_batches": 5, "limit_val_batches": 2, "limit_test_batches": 2},
        "overfit": {"max_epochs": 20, "overfit_batches": 3},
        "profiler": {"max_epochs": 1},
    }[choice]
    assert {key: cfg.trainer[key] for key in expected} == expected
    assert cfg.callbacks.ema is None  # short runs test the weights they trained, not their average


def test_debug_fdr_runs_one_batch_per_stage(tmp_path, tiny_mnist):
    results = train(compose_config([*_data_overrides(tiny_mnist), "debug=fdr"], tmp_path / "run"))
    assert results["ckpt_path"] is None  # fast_dev_run saves nothing and tests the weights in memory
    assert 0.0 <= results["test/both_acc"] <= 1.0


@pytest.mark.slow
def test_debug_limit_trains_a_few_batches_per_epoch(tmp_path, tiny_mnist):
    results = train(compose_config([*_data_overrides(tiny_mnist), "debug=limit"], tmp_path / "run"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 5 training batches per epoch (of tiny MNIST's 14); last.ckpt holds the end of the final epoch.
    assert (last["epoch"], last["global_step"]) == (2, 15)
    assert results["test/both_acc"] is not None


@pytest.mark.slow
def test_debug_overfit_learns_its_few_batches(tmp_path, tiny_mnist):
    overrides = [*_data_overrides(tiny_mnist), "debug=overfit", "logger=csv"]
    train(compose_config(overrides, tmp_path / "run"))
    with open(tmp_path / "run" / "csv" / "metrics.csv", newline="") as file:
        train_acc = [float(row["train/both_acc"]) for row in csv.DictReader(file) if row["train/both_acc"]]
    # 20 epochs of the same 3 batches (75 pairs): a model that can learn gets most of them right, from
    # near chance (1 in 10 digits times 1 in 19 sums) in the first epoch.
    assert len(train_acc) == 20
    assert train_acc[0] < 0.3 and train_acc[-1] >= 0.8


@pytest.mark.slow
def test_debug_profiler_writes_its_report_into_the_run_folder(tmp_path, tiny_mnist):
    overrides = [*_data_overrides(tiny_mnist), "debug=profiler", "trainer.limit_train_batches=3"]
    train(compose_config(overrides, tmp_path / "run"))
    report = (tmp_path / "run" / "fit-profiler.txt").read_text()
    assert "Profiler Report" in report and "run_training_epoch" in report
    assert "Profiler Report" in (tmp_path / "run" / "test-profiler.txt").read_text()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/both_acc"] is not None
