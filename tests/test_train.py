"""The training pipeline through the real Trainer: fast_dev_run for every model, outputs of a short run."""

import json
import math
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_adder import devices
from mnist_adder.training.train import train

from conftest import NO_DETECTOR, compose_config, tiny_debug_overrides
from test_config import image_number_models

ROOT = Path(__file__).resolve().parents[1]
TEST_METRICS = ("test/digit_acc", "test/sum_acc", "test/both_acc", "test/loss")


@pytest.mark.parametrize("model", image_number_models())
def test_fast_dev_run_every_model(make_cfg, tiny_mnist, model):
    cfg = make_cfg([f"model={model}", *tiny_debug_overrides(tiny_mnist)])
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
            *NO_DETECTOR,
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
    overrides = [*tiny_debug_overrides(tiny_mnist), "seed=0"]
    # Two folders: a run never writes into another run's folder.
    first = train(compose_config(overrides, tmp_path / "first"))
    second = train(compose_config(overrides, tmp_path / "second"))
    assert first["test/loss"] == second["test/loss"]


class PresetProbe(Callback):
    """What a GPU preset does during fit: the dtype autocast gives the network's outputs, where the data
    lives and whether cuDNN autotuning is on (added as +callbacks.preset_probe; see below)."""

    seen: ClassVar[dict[str, Any]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images, _ = trainer.datamodule._splits["train"]
        PresetProbe.seen |= {"benchmark": torch.backends.cudnn.benchmark, "data_device": images.device}
        PresetProbe.seen["model_device"] = pl_module.device

        def record(module: torch.nn.Module, inputs: Any, outputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                PresetProbe.seen["train_logits_dtype"] = outputs[0].dtype

        pl_module.net.register_forward_hook(record)


GPU_PRESETS = {
    # The GPU presets with the accelerator swapped for the CPU: bf16 autocast, data on the device and
    # benchmark stay as the preset has them, so a dtype or config mistake in them shows here.
    "trainer=gpu": ["trainer=gpu", "trainer.max_epochs=1"],
    "experiment=fast_gpu": ["experiment=fast_gpu"],  # its batch of 1024: the whole tiny training split
}


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_train_on_the_cpu(make_cfg, tiny_mnist, preset, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the Trainer sets it; undone after
    cfg = make_cfg(
        [
            *GPU_PRESETS[preset],
            "trainer.accelerator=cpu",
            "trainer.limit_train_batches=3",
            "trainer.enable_progress_bar=false",
            f"paths.data_dir={tiny_mnist}",
            "data.val_size=50",
            "+callbacks.preset_probe._target_=test_train.PresetProbe",
            *NO_DETECTOR,
        ]
    )
    assert (cfg.trainer.precision, cfg.trainer.benchmark, cfg.data.on_device) == ("bf16-mixed", True, True)
    PresetProbe.seen.clear()
    results = train(cfg)
    assert results["precision"] == "bf16-mixed"
    assert PresetProbe.seen == {
        "benchmark": True,
        "data_device": torch.device("cpu"),
        "model_device": torch.device("cpu"),
        "train_logits_dtype": torch.bfloat16,
    }
    for key in TEST_METRICS:
        assert math.isfinite(results[key])


def test_auto_trainer_picks_the_precision_of_this_machine(make_cfg):
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert make_cfg(["trainer=auto"]).trainer.precision == expected
    # Precision follows the accelerator given, not only what the machine has.
    assert make_cfg(["trainer=auto", "trainer.accelerator=cpu"]).trainer.precision == "32-true"


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it(monkeypatch):
    # No GPU here: what torch reports is faked; the choice auto_precision makes from it is real.
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert [devices.auto_precision(a) for a in ("auto", "gpu", "cpu", "mps")] == [
        "bf16-mixed",
        "bf16-mixed",
        "32-true",
        "32-true",
    ]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # before Ampere
    assert devices.auto_precision("auto") == "32-true"


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a CUDA GPU: bash scripts/gpu_check.sh"
)
def test_the_gpu_check_script_stops_at_once_without_a_gpu():
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no CUDA GPU visible")
