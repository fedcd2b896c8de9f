"""The benchmark runs both paths for real and prints what it promises (timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from mnist_adder.tools.benchmark import benchmark

from conftest import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_rows(tiny_mnist: Path, run_dir: Path, *options: str) -> list[dict]:
    """Run scripts/benchmark.py on tiny MNIST with `options` and format=json; the JSON lines it printed."""
    cmd = [
        sys.executable,
        "scripts/benchmark.py",
        *options,
        "format=json",
        f"paths.data_dir={tiny_mnist}",
        'overrides=["data.val_size=50","data.batch_size=32"]',
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_benchmark_measures_both_paths_of_one_model(tiny_mnist, tmp_path, capsys):
    # The fast version of the script's tests below, in this process: 2 timed steps of the seed network.
    options = ["models=[seed]", "steps=2", "warmup=1", "repeats=1", "format=json"]
    data = [f"paths.data_dir={tiny_mnist}", 'overrides=["data.val_size=50","data.batch_size=32"]']
    cfg = compose_config([*options, *data], tmp_path / "bench", config_name="benchmark")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # the benchmark composes train runs
        (row,) = benchmark(cfg)
    assert (row["model"], row["batch_size"], row["params"]) == ("seed", 32, 21_843)
    assert row["project_img_s"] > 0 and row["raw_img_s"] > 0 and row["device"].startswith("cpu")
    assert json.loads(capsys.readouterr().out) == {
        k: row[k] for k in ("model", "project_img_s", "raw_img_s", "ratio", "device")
    }


@pytest.mark.slow
def test_benchmark_json_lines(tiny_mnist, tmp_path):
    rows = _benchmark_rows(
        tiny_mnist, tmp_path / "bench", "models=[small,seed]", "steps=3", "warmup=1", "repeats=1"
    )
    assert [r["model"] for r in rows] == ["small", "seed"]
    for r in rows:
        assert r["project_img_s"] > 0 and r["raw_img_s"] > 0
        assert abs(r["ratio"] - r["project_img_s"] / r["raw_img_s"]) < 1e-2
        assert r["device"].startswith("cpu")


@pytest.mark.slow
def test_benchmark_puts_adders_side_by_side(tiny_mnist, tmp_path):
    rows = _benchmark_rows(
        tiny_mnist,
        tmp_path / "bench",
        "models=[small]",
        "adders=[mlp,shift,conv]",
        "steps=2",
        "warmup=1",
        "repeats=1",
    )
    assert [r["model"] for r in rows] == ["small/mlp", "small/shift", "small/conv"]
    assert all(r["project_img_s"] > 0 and r["raw_img_s"] > 0 for r in rows)


@pytest.mark.slow
def test_benchmark_fast_vs_seed_epoch(tiny_mnist, tmp_path):
    run_dir = tmp_path / "bench"
    (row,) = _benchmark_rows(tiny_mnist, run_dir, "fast=true", "repeats=1")
    assert row["seed_epoch_seconds"] > 0 and row["device"].startswith("cpu")
    assert abs(row["fast_vs_seed_epoch"] - row["fast_fit_seconds"] / row["seed_epoch_seconds"]) < 1e-2
    # The fast run went through scripts/train.py's path: selected on validation, tested, its Timer's
    # fit_seconds in its metrics.json.
    metrics = json.loads((run_dir / "fast_0" / "metrics.json").read_text())
    assert metrics["fit_seconds"] == row["fast_fit_seconds"]
    assert metrics["best_val/both_acc"] is not None and Path(metrics["ckpt_path"]).is_file()
    assert metrics["test/digit_acc"] == row["fast_test_digit_acc"]
    # experiment=fast reads digits with test-time shifts: their cost is measured beside the fit.
    assert row["test_images"] > 0
    assert row["predict_seconds_shifts"] > row["predict_seconds_plain"] > 0
