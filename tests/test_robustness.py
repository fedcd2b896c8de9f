"""scripts/eval.py robustness=true: the test set under seeded, batched corruptions in pixel space."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_adder.cli import guarded
from mnist_adder.data import load_mnist, normalize
from mnist_adder.data.corruptions import CORRUPTIONS, corrupt, invert, thicken, thin, to_pixels
from mnist_adder.evaluation.evaluate import evaluate, evaluation_trainer, run_datamodule
from mnist_adder.evaluation.robustness import CorruptedBatches, evaluate_robustness
from mnist_adder.inference.checkpoint import load_checkpoint

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 1000  # the first 1,000 test images: enough to see each corruption, short enough for CI


@pytest.fixture(scope="module")
def real_images(real_data_dir):
    images, _ = load_mnist(real_data_dir, train=False)
    return normalize(images[:256]).unsqueeze(1)


@pytest.fixture(scope="module")
def robustness_run(trained_run, real_data_dir, tmp_path_factory):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]
    run_dir = tmp_path_factory.mktemp("robustness")
    overrides = [
        f"ckpt_path={ckpt_path}",
        f"paths.data_dir={real_data_dir}",
        "robustness=true",
        f"robustness_images={IMAGES}",
    ]
    evaluate(compose_config(overrides, run_dir, config_name="eval"))
    return run_dir, json.loads((run_dir / "robustness.json").read_text())


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_images_mnist_like_and_is_seeded(real_images, name):
    corruption = CORRUPTIONS[name]
    for level in corruption.levels:
        out = corrupt(real_images, corruption.fn, level, _generator(1))
        assert out.shape == real_images.shape and out.dtype == real_images.dtype
        pixels = to_pixels(out)
        assert pixels.min() >= 0 and pixels.max() <= 1
        assert not torch.allclose(out, real_images, atol=1e-3)  # each severity does something
        assert torch.equal(out, corrupt(real_images, corruption.fn, level, _generator(1)))  # reproducible


def test_random_corruptions_draw_per_image_from_the_seed(real_images):
    for name in ("rotation", "shift", "scale", "shear", "gaussian_noise"):
        fn, level = CORRUPTIONS[name].fn, CORRUPTIONS[name].levels[1]
        assert not torch.equal(
            corrupt(real_images, fn, level, _generator(1)), corrupt(real_images, fn, level, _generator(2))
        )


def test_corruptions_act_in_pixel_space(real_images):
    pixels = to_pixels(real_images)
    # Inversion is the photographic negative: background 0 becomes 1, ink 1 becomes 0.
    assert torch.allclose(to_pixels(corrupt(real_images, invert, 1.0, _generator(0))), 1 - pixels, atol=1e-5)
    ink = pixels.sum()
    assert to_pixels(corrupt(real_images, thicken, 3, _generator(0))).sum() > 1.5 * ink
    assert to_pixels(corrupt(real_images, thin, 3, _generator(0))).sum() < 0.5 * ink
    # Level 0 of a geometric corruption leaves the image as it was.
    same = corrupt(real_images, CORRUPTIONS["rotation"].fn, 0.0, _generator(0))
    assert torch.allclose(same, real_images, atol=1e-4)


@pytest.mark.slow
def test_robustness_json_has_every_corruption_and_severity(robustness_run):
    run_dir, report = robustness_run
    rows = report["results"]
    assert report["images"] == IMAGES and report["seed"] == 0
    assert [(r["corruption"], r["severity"]) for r in rows] == [("none", 0)] + [
        (name, severity) for name in CORRUPTIONS for severity in (1, 2, 3)
    ]
    for row in rows:
        for key in ("digit_acc", "sum_acc", "both_acc", "digit_ece", "sum_ece"):
            assert 0 <= row[key] <= 1, (row["corruption"], row["severity"], key)
    clean = rows[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(clean["digit_acc"] - metrics["test/digit_acc"]) < 0.02  # 1,000 images vs all 10,000
    by_cell = {(r["corruption"], r["severity"]): r for r in rows}
    # Honest floors for a model trained 200 steps with augmentation (it had 97 % on clean digits):
    # mild corruptions cost little, the harshest cost much, and the negative is far outside training.
    for name in CORRUPTIONS:
        assert by_cell[(name, 3)]["digit_acc"] < clean["digit_acc"], name
    for name in ("rotation", "shift", "scale", "shear", "blur"):
        assert by_cell[(name, 1)]["digit_acc"] > clean["digit_acc"] - 0.1, name
    assert by_cell[("rotation", 3)]["digit_acc"] < clean["digit_acc"] - 0.2
    assert by_cell[("invert", 3)]["digit_acc"] < 0.5


@pytest.mark.slow
def test_a_tiny_rotation_scores_like_the_clean_test_and_cells_are_reproducible(
    trained_run, real_data_dir, tmp_path
):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]
    module, run_config = load_checkpoint(ckpt_path)
    cfg = compose_config(
        [f"ckpt_path={ckpt_path}", f"paths.data_dir={real_data_dir}"], tmp_path, config_name="eval"
    )
    datamodule = run_datamodule(run_config, cfg)
    trainer = evaluation_trainer(run_config.trainer, cfg, tmp_path)
    datamodule.setup("test")
    batches = datamodule.test_dataloader()
    levels = {"rotation": (0.5,), "gaussian_noise": (0.3,)}
    rows = evaluate_robustness(trainer, module, batches, seed=3, levels=levels, limit=IMAGES)
    clean, tiny_rotation, noise = rows
    assert noise["digit_acc"] < clean["digit_acc"]
    assert abs(tiny_rotation["digit_acc"] - clean["digit_acc"]) <= 0.005
    assert abs(tiny_rotation["sum_acc"] - clean["sum_acc"]) <= 0.005
    again = evaluate_robustness(trainer, module, batches, seed=3, levels=levels, limit=IMAGES)
    assert again == rows  # same seed, same numbers
    first = next(iter(CorruptedBatches(batches, "gaussian_noise", 0.3, seed=1, limit=10)))[0]
    other = next(iter(CorruptedBatches(batches, "gaussian_noise", 0.3, seed=2, limit=10)))[0]
    assert first.shape[0] == 10 and not torch.equal(first, other)


def test_robustness_cells_of_a_tiny_run_are_rows_of_the_test_metrics_and_reproducible(
    tiny_run, tiny_mnist, tmp_path
):
    # The fast version of the test above (tiny_run: a model of a few seconds on tiny MNIST): the rows and
    # their seeding; how much a corruption costs needs a real model.
    ckpt_path = json.loads((tiny_run / "metrics.json").read_text())["ckpt_path"]
    module, run_config = load_checkpoint(ckpt_path)
    cfg = compose_config([f"ckpt_path={ckpt_path}", f"paths.data_dir={tiny_mnist}"], tmp_path, "eval")
    datamodule = run_datamodule(run_config, cfg)
    trainer = evaluation_trainer(run_config.trainer, cfg, tmp_path)
    datamodule.setup("test")
    batches = datamodule.test_dataloader()
    levels = {"rotation": (30.0,), "gaussian_noise": (0.3,)}
    rows = evaluate_robustness(trainer, module, batches, seed=3, levels=levels, limit=100)
    assert [(r["corruption"], r["severity"], r["level"]) for r in rows] == [
        ("none", 0, 0.0),
        ("rotation", 1, 30.0),
        ("gaussian_noise", 1, 0.3),
    ]
    clean = trainer.test(module, dataloaders=CorruptedBatches(batches, None, 0.0, 0, 100), verbose=False)[0]
    assert rows[0]["digit_acc"] == clean["test/digit_acc"] and rows[0]["sum_acc"] == clean["test/sum_acc"]
    assert all(0 <= r[key] <= 1 for r in rows for key in ("digit_acc", "sum_acc", "both_acc", "digit_ece"))
    assert evaluate_robustness(trainer, module, batches, seed=3, levels=levels, limit=100) == rows


BAD_EVAL_INPUT = [
    ("robustness=maybe", "robustness='maybe' is not allowed"),
    ("robustness_images=0", "robustness_images=0 is not allowed"),
    ("ckpt_path=/nonexistent/best.ckpt", "does not exist"),
]


def _eval_args(override: str) -> list[str]:
    return ["ckpt_path=/nonexistent/best.ckpt", override] if "ckpt_path" not in override else [override]


@pytest.mark.parametrize("override,expected", BAD_EVAL_INPUT)
def test_bad_eval_input_is_one_error_line_in_this_process(override, expected, tmp_path, capsys):
    # The fast version of the test below: the same inputs through the scripts' error path (cli.guarded).
    with pytest.raises(SystemExit) as exit_info:
        guarded(evaluate, compose_config(_eval_args(override), tmp_path, config_name="eval"))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith("error: ") and expected in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow  # scripts/eval.py in a subprocess
@pytest.mark.parametrize("override,expected", BAD_EVAL_INPUT)
def test_bad_eval_input_is_one_error_line(override, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/eval.py", *_eval_args(override), f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
