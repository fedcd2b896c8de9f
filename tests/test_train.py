"""The training pipeline through the real Trainer: fast_dev_run for every model, outputs of a short run."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_adder.training.train import train

from conftest import compose_config
from test_config import choices

TEST_METRICS = ("test/digit_acc", "test/sum_acc", "test/both_acc", "test/loss")


@pytest.mark.parametrize("model", choices("model"))
def test_fast_dev_run_every_model(make_cfg, tiny_mnist, model):
    cfg = make_cfg([f"model={model}", "trainer=debug", f"paths.data_dir={tiny_mnist}", "data.val_size=50"])
    results = train(cfg)
    for key in TEST_METRICS:
        assert 0.0 <= results[key] <= 1.0 or key == "test/loss"


def test_short_run_writes_metrics_checkpoints_and_tensorboard(make_cfg, tiny_mnist, tmp_path):
    cfg = make_cfg(
        [
            f"paths.data_dir={tiny_mnist}",
            "data.val_size=50",
            "data.batch_size=50",
            "data.eval_batch_size=40",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
        ]
    )
    results = train(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == results  # JSON keeps floats exactly (approx cannot compare the per-class lists)
    for key in (*TEST_METRICS, "test/sum_given_digit_acc", "fit_seconds", "ckpt_path"):
        assert saved[key] is not None
    assert saved["ckpt_path"].startswith(str(run / "checkpoints"))
    assert (run / "checkpoints" / "last.ckpt").is_file()

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    for stage in ("train", "val"):
        for name in ("loss", "digit_loss", "sum_loss", "digit_acc", "sum_acc", "both_acc"):
            assert f"{stage}/{name}" in scalars
    assert any(tag.startswith("lr-") for tag in scalars)


def test_seed_zero_is_a_seed(tiny_mnist, tmp_path):
    overrides = ["trainer=debug", f"paths.data_dir={tiny_mnist}", "data.val_size=50", "seed=0"]
    # Two folders: a run never writes into another run's folder.
    first = train(compose_config(overrides, tmp_path / "first"))
    second = train(compose_config(overrides, tmp_path / "second"))
    assert first["test/loss"] == second["test/loss"]
