"""A real run on real MNIST through the command line, as a user would start it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import NO_DETECTOR

ROOT = Path(__file__).resolve().parents[1]
# Honest floors for 300 steps of batch 128 (under one epoch; chance is 10 % and about 10 %):
# the small model reaches about 98 % on both here, so these catch a broken pipeline, not noise.
DIGIT_FLOOR, SUM_FLOOR = 0.95, 0.94

pytestmark = pytest.mark.slow  # 300 steps on real MNIST, through a subprocess


def test_train_script_on_real_mnist(real_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "scripts/train.py",
        f"paths.data_dir={real_data_dir}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=1",
        *NO_DETECTOR,
        "trainer.limit_train_batches=300",
        "data.batch_size=128",
        "trainer.enable_progress_bar=false",
        "seed=1",
        # The default weight averaging, with a horizon (~100 steps) that fits a 300-step run.
        "callbacks.ema.decay=0.99",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/digit_acc"] >= DIGIT_FLOOR, metrics
    assert metrics["test/sum_acc"] >= SUM_FLOOR, metrics
    assert Path(metrics["ckpt_path"]).is_file()
    assert "test/both_acc" in result.stdout  # the results table is printed
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"]
    assert "val/both_acc" in scalars and "train/step_loss" in scalars
