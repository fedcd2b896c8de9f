"""scripts/eval.py: a checkpoint tested again gives exactly the numbers its training run reported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_adder.cli import guarded
from mnist_adder.errors import UserError
from mnist_adder.evaluation.evaluate import evaluate
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.training.module import DigitSumModule
from mnist_adder.training.train import train

from conftest import NO_DETECTOR, compose_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eval_script_reproduces_the_training_runs_test_numbers(trained_run, real_data_dir, tmp_path):
    trained = json.loads((trained_run / "metrics.json").read_text())
    run_dir = tmp_path / "eval_run"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/eval.py",
            f"ckpt_path={trained['ckpt_path']}",
            f"paths.data_dir={real_data_dir}",
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/both_acc" in result.stdout and "test/sum_given_digit_acc" in result.stdout  # the table
    assert "digit_acc %" in result.stdout and "sum_acc %" in result.stdout  # and the per-class one
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    # (Training's *_uncalibrated keys are its test of the raw model before it stored the temperatures; the
    # checkpoint eval is given is the calibrated one.)
    test_keys = [k for k in trained if k.startswith("test/") and not k.endswith("_uncalibrated")]
    assert {"test/digit_acc", "test/sum_acc", "test/loss", "test/sum_given_digit_acc"} <= set(test_keys)
    for key in test_keys:
        assert evaluated[key] == trained[key], key  # exactly: same weights, pairs, batches and precision
    # P(sum right | digit right) = P(both right) / P(digit right); the loss is the sum of the two losses.
    assert evaluated["test/sum_given_digit_acc"] == pytest.approx(
        evaluated["test/both_acc"] / evaluated["test/digit_acc"], abs=1e-6
    )
    assert evaluated["test/sum_given_digit_acc"] != evaluated["test/sum_acc"]
    assert evaluated["test/loss"] == pytest.approx(evaluated["test/digit_loss"] + evaluated["test/sum_loss"])
    assert len(evaluated["test/digit_acc_per_class"]) == 10
    assert len(evaluated["test/sum_acc_per_class"]) == 19
    assert evaluated["ckpt_path"] == str(Path(trained["ckpt_path"]).resolve())


def test_eval_of_a_tiny_run_gives_its_test_numbers(tiny_run, tiny_mnist, tmp_path):
    # The fast version of the test above, in this process (tiny_run: a model of a few seconds).
    trained = json.loads((tiny_run / "metrics.json").read_text())
    cfg = compose_config(
        [
            f"ckpt_path={trained['ckpt_path']}",
            f"paths.data_dir={tiny_mnist}",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path / "eval",
        config_name="eval",
    )
    evaluated = evaluate(cfg)
    # (*_uncalibrated: training's test of the raw model before it stored the temperatures.)
    test_keys = [k for k in trained if k.startswith("test/") and not k.endswith("_uncalibrated")]
    assert {"test/digit_acc", "test/sum_acc", "test/loss", "test/digit_ece"} <= set(test_keys)
    assert {k: evaluated[k] for k in test_keys} == {k: trained[k] for k in test_keys}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == evaluated
    assert (tmp_path / "eval" / "reliability_digit.png").is_file()


@pytest.mark.slow  # a bf16 training on the CPU
def test_eval_takes_precision_from_the_checkpoint(tiny_mnist, tmp_path):
    # Trained in bf16 autocast: testing in float32 would change the numbers, so eval must not.
    data = [f"paths.data_dir={tiny_mnist}", "data.val_size=50", "data.eval_batch_size=40"]
    trained = train(
        compose_config(
            [
                *data,
                "trainer.max_epochs=1",
                *NO_DETECTOR,
                "trainer.precision=bf16-mixed",
                "trainer.enable_progress_bar=false",
            ],
            tmp_path / "train",
        )
    )
    eval_args = [f"ckpt_path={trained['ckpt_path']}", f"paths.data_dir={tiny_mnist}"]
    evaluated = evaluate(compose_config(eval_args, tmp_path / "eval", config_name="eval"))
    assert evaluated["precision"] == "bf16-mixed"
    assert evaluated["test/loss"] == trained["test/loss"]
    assert evaluated["test/digit_acc_per_class"] == trained["test/digit_acc_per_class"]
    in_float32 = evaluate(
        compose_config([*eval_args, "trainer.precision=32-true"], tmp_path / "eval32", config_name="eval")
    )
    assert in_float32["precision"] == "32-true" and in_float32["test/loss"] != trained["test/loss"]


@pytest.mark.slow
def test_load_checkpoint_rebuilds_the_model_in_eval_mode(trained_run):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]
    module, config = load_checkpoint(ckpt_path)
    assert isinstance(module, DigitSumModule) and not module.training
    assert config.model.net.backbone._target_ == "mnist_adder.models.ConvBackbone"
    stored = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in stored.items())


def _other_projects_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, path)
    return path


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d: d / "missing.ckpt", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: (d / "notes.ckpt").write_text("not a checkpoint") and d / "notes.ckpt", "not a PyTorch"),
        (lambda d: _other_projects_checkpoint(d / "other.ckpt"), "not a checkpoint of mnist-adder"),
    ],
    ids=["missing", "folder", "text-file", "other-project"],
)
def test_bad_checkpoints_are_refused_with_one_clear_line(tmp_path, make, expected):
    with pytest.raises(UserError) as err:
        load_checkpoint(make(tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value) and "ckpt_path=" in str(err.value)


def test_eval_without_a_checkpoint_exits_with_an_error_line(tmp_path, capsys):
    cfg = compose_config([], tmp_path / "run", config_name="eval")
    with pytest.raises(SystemExit) as exit_info:
        guarded(evaluate, cfg)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: no checkpoint given") and "ckpt_path=" in stderr
    assert len(stderr.strip().splitlines()) == 1
