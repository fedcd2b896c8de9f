"""logger=csv|mlflow|wandb|many: a real short run per logger, read back through each logger's own reader."""

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from mnist_adder.training.train import train

from conftest import compose_config, require_extra, tiny_train_overrides

# metrics.json is the same whatever the loggers: these keys, no more, no fewer.
METRICS_JSON_KEYS = {
    *(f"test/{name}" for name in ("loss", "digit_loss", "sum_loss", "digit_acc", "sum_acc", "both_acc")),
    "test/sum_given_digit_acc",
    "test/digit_ece",
    "test/sum_ece",
    "test/sum_coherence_gap",
    # Calibrated by default (calibrate=true): the test above is the calibrated model's, these the raw one's.
    *(f"test/{name}_uncalibrated" for name in ("loss", "digit_loss", "sum_loss", "digit_ece", "sum_ece")),
    "digit_temperature",
    "sum_temperature",
    "test/digit_acc_per_class",
    "test/sum_acc_per_class",
    "ckpt_path",
    "not_digit_threshold",  # None here: tiny runs fit no detector (not_digit_accept=null)
    "best_val/both_acc",
    "fit_seconds",
    "num_parameters",
    "model",
    "seed",
    "resumed_from",
    "precision",
}
LOGGER_CLASSES = {
    "csv": {"csv": "CSVLogger"},
    "mlflow": {"mlflow": "MLFlowLogger"},
    "wandb": {"wandb": "WandbLogger"},
    "many": {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger", "mlflow": "MLFlowLogger"},
}


@pytest.mark.parametrize("choice", LOGGER_CLASSES)
def test_logger_choices_are_lightnings_loggers(choice, tmp_path):
    cfg = compose_config([f"logger={choice}", f"paths.log_dir={tmp_path}/logs"], tmp_path / "run")
    targets = {name: entry._target_ for name, entry in cfg.logger.items()}
    assert targets == {
        name: f"pytorch_lightning.loggers.{cls}" for name, cls in LOGGER_CLASSES[choice].items()
    }
    if "mlflow" in cfg.logger:  # a local store under logs/mlflow/, no server
        assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/logs/mlflow/mlflow.db"
    if "wandb" in cfg.logger:  # no account, no network unless asked
        assert cfg.logger.wandb.offline is True


def _run(tmp_path: Path, tiny_mnist: Path, logger: str) -> tuple[dict, Path]:
    overrides = [
        *tiny_train_overrides(tiny_mnist),
        "trainer.max_epochs=1",
        f"logger={logger}",
        f"paths.log_dir={tmp_path}/logs",
        "extras.print_config=false",
    ]
    run_dir = tmp_path / "run"
    train(compose_config(overrides, run_dir))
    return json.loads((run_dir / "metrics.json").read_text()), run_dir


@pytest.mark.slow
def test_many_loggers_get_the_same_metrics_and_config(tmp_path, tiny_mnist):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    MlflowClient = require_extra("mlflow.tracking", "mlflow").MlflowClient

    metrics, run_dir = _run(tmp_path, tiny_mnist, "many")
    assert set(metrics) == METRICS_JSON_KEYS
    both_acc, digit_acc_3 = metrics["test/both_acc"], metrics["test/digit_acc_per_class"][3]

    # TensorBoard, as before.
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert events.Scalars("test/both_acc")[-1].value == pytest.approx(both_acc)

    # CSV: Lightning's metrics.csv (a column per metric) and hparams.yaml (the run's config).
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    test_rows = [row for row in rows if row["test/both_acc"]]
    assert len(test_rows) == 1 and float(test_rows[0]["test/both_acc"]) == pytest.approx(both_acc)
    per_class = [row for row in rows if row.get("test/digit_acc_per_class/3")]
    assert float(per_class[-1]["test/digit_acc_per_class/3"]) == pytest.approx(digit_acc_3)
    assert any(row["val/both_acc"] for row in rows) and any(row["train/step_loss"] for row in rows)
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["net"]["_target_"] == "mnist_adder.models.DigitSumNet"
    assert hparams["seed"] == 42

    # MLflow: its client on the local store under logs/mlflow/.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/logs/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir)
    assert run.data.metrics["test/both_acc"] == pytest.approx(both_acc)
    assert run.data.metrics["test/digit_acc_per_class/3"] == pytest.approx(digit_acc_3)
    assert len(client.get_metric_history(run.info.run_id, "val/both_acc")) == 1  # one validation
    assert run.data.params["model/net/_target_"] == "mnist_adder.models.DigitSumNet"
    assert run.data.params["seed"] == "42"
    assert run.data.params["data/batch_size"] == "25"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, tiny_mnist, monkeypatch):
    wandb = require_extra("wandb", "wandb")
    # Belt and braces: the config says offline, and so does the environment; no network is tried.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        metrics, run_dir = _run(tmp_path, tiny_mnist, "wandb")
        run = wandb.run
        assert run is not None and run.offline
        # The run's own record of what it was given: summary (last value of each metric) and config.
        summary = run.summary  # item access and .get (dict(summary) fails: it has no keys())
        assert summary.get("test/both_acc") == pytest.approx(metrics["test/both_acc"])
        assert summary.get("test/digit_acc_per_class/3") == pytest.approx(
            metrics["test/digit_acc_per_class"][3]
        )
        assert summary.get("val/both_acc") is not None and summary.get("train/step_loss") is not None
        assert run.config["model"]["net"]["_target_"] == "mnist_adder.models.DigitSumNet"
        assert run.config["seed"] == 42
        run_id = run.id
    finally:
        wandb.finish()
    # On disk, as wandb documents an offline run: wandb/offline-run-<time>-<id>/run-<id>.wandb, which
    # `wandb sync` uploads; it holds the logged keys.
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    # wandb's service process writes the file after finish() returns: wait for it as `wandb sync` would
    # (on a loaded machine CI saw only the file's header at first).
    deadline = time.monotonic() + 180  # generous: CI runs two workers on two cores
    while True:
        records = (folder / f"run-{run_id}.wandb").read_bytes()
        if b"test/both_acc" in records or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"test/both_acc" in records and b"mnist_adder.models.DigitSumNet" in records
