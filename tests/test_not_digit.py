""" "Not a digit": the score, its buffers in checkpoints, its fitting, the not-digit set, the measurement."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.cli import build
from mnist_adder.config_checks import config_problems
from mnist_adder.data.mnist import load_mnist
from mnist_adder.data.not_digits import (
    DEFAULT_FONT,
    DIGIT_PHOTO_FORMS,
    DIGIT_RENDERINGS,
    LETTERS,
    NOT_DIGIT_KINDS,
    digit_photo_set,
    digit_rendering_set,
    not_digit_set,
)
from mnist_adder.errors import UserError
from mnist_adder.evaluation.not_digit import auroc
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.predict import reject_threshold
from mnist_adder.models import ConvBackbone, DigitSumNet, MLPAdder, SeedAdder, SeedBackbone
from mnist_adder.models.not_digit import layer_shapes
from mnist_adder.postfit import not_digit as postfit
from mnist_adder.postfit.not_digit import DetectorFit, fit_not_digit_detector
from mnist_adder.training import train as pipeline

from conftest import compose_config, make_dm, make_tiny_mnist, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "conv": lambda: DigitSumNet(ConvBackbone(), MLPAdder(), "softmax"),
    "conv_stem": lambda: DigitSumNet(ConvBackbone((12, 24, 64), stem_channels=8), MLPAdder(), "detached"),
    "seed": lambda: DigitSumNet(SeedBackbone(), SeedAdder(), "logits"),
}


def _fitted_at_random(net: DigitSumNet, hidden: int = 5, seed: int = 0) -> DigitSumNet:
    """The net with a detector of random layers (what fitting stores, without the fitting)."""
    generator = torch.Generator().manual_seed(seed)
    features = net.eval().not_digit_features(torch.zeros(1, 1, 28, 28))
    width = features.shape[1]
    shapes = layer_shapes(hidden, width)
    layers = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    layers["scale"] = layers["scale"].abs() + 0.5
    net.not_digit.set(layers, threshold=0.5)
    return net


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_detector_travels_in_the_state_dict_and_older_ones_load_without(backbone):
    images = torch.randn(6, 1, 28, 28)
    fitted = _fitted_at_random(BACKBONES[backbone]())
    with torch.inference_mode():
        score = fitted.not_digit_score(images)
    assert score.shape == (6,) and torch.isfinite(score).all()
    # The score is the classifier's output on the standardised features.
    features = fitted.not_digit_features(images)
    detector = fitted.not_digit
    standardised = (features - detector.mean) / detector.scale
    hidden = torch.relu(standardised @ detector.hidden_weight.T + detector.hidden_bias)
    assert torch.allclose(score, hidden @ detector.output_weight + detector.output_bias)

    loaded = BACKBONES[backbone]().eval()
    assert not loaded.not_digit.fitted
    loaded.load_state_dict(fitted.state_dict())  # the fresh net takes the stored shapes
    assert loaded.not_digit.fitted and float(loaded.not_digit.threshold) == 0.5
    with torch.inference_mode():
        assert torch.equal(loaded.not_digit_score(images), score)
        # The heads are untouched by the detector.
        for a, b in zip(loaded(images, torch.eye(10)[:6]), fitted(images, torch.eye(10)[:6]), strict=True):
            assert torch.equal(a, b)

    # A state dict from before the detector existed loads as "no detector": no score, nothing refused.
    old = {k: v for k, v in fitted.state_dict().items() if not k.startswith("not_digit.")}
    older = BACKBONES[backbone]().eval()
    older.load_state_dict(old)
    assert not older.not_digit.fitted
    with torch.inference_mode():
        assert torch.isnan(older.not_digit_score(images)).all()
    assert reject_threshold(None, older) is None

    # The linear discriminant's buffers (weight, bias: a format that lived a few hours) are no longer read.
    earlier = dict(old)
    earlier["not_digit.weight"] = torch.randn(NUM_DIGITS + 3, features.shape[1], dtype=torch.float64)
    earlier["not_digit.bias"] = torch.randn(NUM_DIGITS + 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"not_digit\.weight"):
        BACKBONES[backbone]().load_state_dict(earlier)


def test_reject_threshold_values(tmp_path):
    fitted = _fitted_at_random(BACKBONES["conv"]())
    assert reject_threshold(None, fitted) == 0.5  # the stored one
    assert reject_threshold(2, fitted) == 2.0 and reject_threshold(-1.5, fitted) == -1.5
    assert reject_threshold("off", fitted) is None and reject_threshold("OFF", fitted) is None
    assert reject_threshold(False, fitted) is None
    for bad in ("abc", True, float("nan"), float("inf"), [1, 2], "1.5x"):
        with pytest.raises(UserError, match=r"reject_threshold=.* is not allowed: null"):
            reject_threshold(bad, fitted)
    with pytest.raises(UserError, match="no not-a-digit detector"):
        reject_threshold(3.0, BACKBONES["conv"]())
    # The same words where the configs are checked (eval, calibrate), with the other new keys.
    cfg = compose_config(
        ["reject_threshold=maybe", "not_digits=2", "not_digits_seed=x", "not_digit_accept=1.5"],
        tmp_path / "run",
        config_name="eval",
    )
    problems = {p.split("=")[0]: p for p in config_problems(cfg)}
    assert sorted(problems) == ["not_digit_accept", "not_digits", "not_digits_seed", "reject_threshold"]
    assert problems["reject_threshold"].startswith("reject_threshold='maybe' is not allowed: null")
    assert problems["not_digit_accept"].startswith("not_digit_accept=1.5 is not allowed: the share")


@pytest.mark.parametrize("script", ["predict", "demo"])
def test_bad_reject_threshold_is_one_error_line(script, tmp_path):
    # Told before the checkpoint is even looked for (it does not exist here).
    given = [f"ckpt_path={tmp_path / 'missing.ckpt'}", "reject_threshold=sometimes"]
    if script == "predict":
        given += ["image=x.png", "number=1"]
    result = subprocess.run(
        [sys.executable, f"scripts/{script}.py", *given],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: reject_threshold='sometimes' is not allowed: null (the threshold stored in the "
        "checkpoint), a number (refuse images whose not-a-digit score is above it) or off (refuse none)."
    ]


def test_the_not_digit_set_is_the_same_from_the_same_seed():
    first = not_digit_set(seed=5, per_kind=8, letter_repeats=1)
    again = not_digit_set(seed=5, per_kind=8, letter_repeats=1)
    other = not_digit_set(seed=6, per_kind=8, letter_repeats=1)
    assert torch.equal(first.pixels, again.pixels)
    assert first.kinds == again.kinds and first.descriptions == again.descriptions
    assert not torch.equal(first.pixels[:32], other.pixels[:32])
    # Every kind, and every letter once, each made MNIST-like by predict's preprocessing.
    assert set(first.kinds) == set(NOT_DIGIT_KINDS)
    letters = [
        d.split(",")[0].removeprefix("letter ")
        for k, d in zip(first.kinds, first.descriptions, strict=True)
        if k == "letters"
    ]
    assert sorted(letters) == sorted(LETTERS)
    assert first.pixels.dtype == torch.uint8 and first.pixels.shape[1:] == (28, 28)
    assert (first.pixels.flatten(1).max(1).values == 255).all()  # preprocessing stretches the ink
    assert len(first) + sum(first.refused_by_preprocessing.values()) == 4 * 8 + len(LETTERS)
    assert first.fonts  # which fonts drew the letters


def test_digit_photos_are_the_same_from_the_same_seed(real_data_dir):
    from mnist_adder.data import load_mnist

    images, labels = load_mnist(real_data_dir, train=False)
    first = digit_photo_set(images[:12], labels[:12], seed=2)
    again = digit_photo_set(images[:12], labels[:12], seed=2)
    assert torch.equal(first.pixels, again.pixels)
    assert first.kinds == list(DIGIT_PHOTO_FORMS) * 4
    assert first.descriptions == [f"digit {int(d)}" for d in labels[:12]]


def test_auroc_is_the_chance_an_outlier_scores_above_an_inlier():
    generator = torch.Generator().manual_seed(0)
    outliers = torch.randint(0, 20, (300,), generator=generator).double()
    inliers = torch.randint(0, 15, (200,), generator=generator).double()
    above = (outliers[:, None] > inliers[None]).double().mean()
    ties = (outliers[:, None] == inliers[None]).double().mean()
    assert auroc(outliers, inliers) == pytest.approx(float(above + ties / 2), abs=1e-12)
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


@pytest.mark.parametrize("backbone", ["conv", pytest.param("seed", marks=pytest.mark.slow)])
def test_fitting_sets_the_threshold_at_the_share_of_validation_digits(backbone, real_data_dir):
    # Fewer images than a real fit, for time (an untrained net: the fitting is what is tested).
    fit = DetectorFit(per_kind=20, letter_repeats=1, photos=60, threshold_photos=40, hidden_units=32)
    dm = make_dm(real_data_dir, val_size=160)
    train_images, train_labels = dm.split_tensors("train")
    net = BACKBONES[backbone]().eval()
    train = (train_images[:2000], train_labels[:2000])
    random_state = torch.random.get_rng_state()
    summary = fit_not_digit_detector(net, train, dm.split_tensors("val"), accept=0.9, fit=fit)
    assert net.not_digit.fitted and float(net.not_digit.threshold) == summary["threshold"]
    assert net.not_digit.hidden_weight.shape == (32, summary["features"])
    # Trained from its own seed: the caller's random state is untouched, and a second fit is the same.
    assert torch.equal(torch.random.get_rng_state(), random_state)
    fitted = {k: v.clone() for k, v in net.not_digit.state_dict().items()}
    fit_not_digit_detector(net, train, dm.split_tensors("val"), accept=0.9, fit=fit)
    for name, value in net.not_digit.state_dict().items():
        assert torch.equal(value, fitted[name]), name
    # Even on this untrained backbone, not-digits it never saw score above most digits.
    unseen = not_digit_set(seed=7, per_kind=20, letter_repeats=1).pixels
    unseen_scores = postfit.net_outputs(net, postfit.normalize(unseen).unsqueeze(1))["not_digit"]
    assert float((unseen_scores > summary["threshold"]).double().mean()) > 0.5
    # 160 validation digits as files and 40 as photos: the threshold accepts 180 of the 200.
    assert summary["validation_accepted"] == pytest.approx(0.9, abs=0.006)
    digits, _ = postfit.threshold_digits(*dm.split_tensors("val"), fit)
    assert len(digits) == 200
    scores = postfit.net_outputs(net, postfit.normalize(digits).unsqueeze(1))["not_digit"]
    assert float((scores <= summary["threshold"]).double().mean()) == summary["validation_accepted"]


@pytest.mark.slow  # trained_run: a real MNIST training with its detector
def test_training_hands_over_a_detector(trained_run):
    # not_digit_accept: 0.99 by default: fitted after fit, stored with the weights that were tested.
    results = json.loads((trained_run / "metrics.json").read_text())
    checkpoint = torch.load(results["ckpt_path"], weights_only=True)
    module, _ = load_checkpoint(results["ckpt_path"])
    assert module.net.not_digit.fitted
    assert results["not_digit_threshold"] == float(module.net.not_digit.threshold)
    assert checkpoint["not_digit"]["threshold"] == results["not_digit_threshold"]
    assert checkpoint["not_digit"]["validation_accepted"] == pytest.approx(0.99, abs=0.002)
    assert "calibration" in checkpoint  # beside the temperatures, not instead of them


@pytest.mark.slow  # trained_run: a real MNIST training with its detector
def test_calibrate_stores_the_detector(calibrated_ckpt):
    module, _ = load_checkpoint(calibrated_ckpt)
    summary = torch.load(calibrated_ckpt, weights_only=True)["not_digit"]  # a record of its own, by name
    assert module.net.not_digit.fitted
    assert float(module.net.not_digit.threshold) == pytest.approx(summary["threshold"])
    assert summary["accept"] == 0.99 and summary["validation_accepted"] == pytest.approx(0.99, abs=0.002)


@pytest.mark.slow
def test_eval_measures_the_detector_and_the_baselines(calibrated_ckpt, real_data_dir, tmp_path):
    from mnist_adder.evaluation.evaluate import evaluate

    run = tmp_path / "eval"
    cfg = compose_config(
        [f"ckpt_path={calibrated_ckpt}", f"paths.data_dir={real_data_dir}", "not_digits=true"],
        run,
        config_name="eval",
    )
    evaluate(cfg)
    report = json.loads((run / "not_digits.json").read_text())
    assert sorted(report["methods"]) == ["energy", "mahalanobis", "max_softmax", "not_digit"]
    assert report["fitted_here"] is None  # the checkpoint's own detector was measured
    assert sorted(report["examples"]) == sorted(str(p) for p in (ROOT / "examples" / "digits").iterdir())
    module, _ = load_checkpoint(calibrated_ckpt)
    detector = report["methods"]["not_digit"]
    assert detector["threshold"] == pytest.approx(float(module.net.not_digit.threshold))
    for method, result in report["methods"].items():
        assert 0 <= result["auroc_mnist_test"] <= 1 and 0 <= result["not_digits_refused"] <= 1
        # Every threshold accepts the stated share of the validation digits it was set on.
        assert result["validation_accepted"] == pytest.approx(0.99, abs=0.002), method
        counts = report["not_digits"]
        refused = sum(result["refused_by_kind"][k] * counts[k] for k in counts) / sum(counts.values())
        assert refused == pytest.approx(result["not_digits_refused"])
    # On a model trained for 200 steps the detector beats max softmax (Hendrycks & Gimpel's baseline).
    assert detector["auroc_mnist_test"] > report["methods"]["max_softmax"]["auroc_mnist_test"]
    assert detector["not_digits_refused"] > report["methods"]["max_softmax"]["not_digits_refused"]
    # A threshold off is refused: there would be nothing to measure.
    cfg = compose_config(
        [
            f"ckpt_path={calibrated_ckpt}",
            f"paths.data_dir={real_data_dir}",
            "not_digits=true",
            "reject_threshold=off",
        ],
        tmp_path / "eval_off",
        config_name="eval",
    )
    with pytest.raises(UserError, match="reject_threshold=off"):
        evaluate(cfg)


def test_the_detector_group_holds_the_fit_defaults_and_refuses_bad_values(tmp_path):
    for config_name in ("train", "calibrate", "eval"):
        cfg = compose_config([], tmp_path, config_name=config_name)
        assert build(cfg.detector, "detector") == DetectorFit()
    cfg = compose_config(["detector.epochs=0"], tmp_path)
    with pytest.raises(UserError, match=r"detector.*epochs must be a whole number of at least 1, not 0"):
        build(cfg.detector, "detector")


def test_a_bad_detector_value_stops_training_before_the_fit(tmp_path):
    data_dir = make_tiny_mnist(tmp_path / "data")
    cfg = compose_config([*tiny_train_overrides(data_dir), "detector.epochs=0"], tmp_path / "run")
    with pytest.raises(UserError, match=r"detector .*epochs must be a whole number of at least 1"):
        pipeline.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


# ---- measured on families it was not fitted to (eval not_digits_unseen=true) ---------------------


def test_digit_renderings_keep_their_labels_and_are_the_same_from_the_same_seed(real_data_dir):
    images, labels = load_mnist(real_data_dir, train=False)
    pixels = images[:20]
    first, first_labels = digit_rendering_set(pixels, labels[:20], [DEFAULT_FONT], seed=3)
    again, again_labels = digit_rendering_set(pixels, labels[:20], [DEFAULT_FONT], seed=3)
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first_labels, again_labels)
    assert sorted(set(first.kinds)) == sorted(DIGIT_RENDERINGS) and len(first) == 20
    for i, kind in enumerate(first.kinds):
        # Re-drawn MNIST digits keep the digit's label; typed ones are the digits 0..9 in turn.
        expected = i % 10 if kind == "typed" else int(labels[i])
        assert int(first_labels[i]) == expected, (i, kind)


def test_unseen_families_refits_without_each_family_and_puts_the_detector_back(real_data_dir):
    from mnist_adder.evaluation.not_digit import format_unseen_families, operating_points, unseen_families

    fit = DetectorFit(
        per_kind=20, letter_repeats=1, photos=60, threshold_photos=40, hidden_units=16, epochs=5
    )
    dm = make_dm(real_data_dir, val_size=160)
    train_images, train_labels = dm.split_tensors("train")
    train = (train_images[:1000], train_labels[:1000])
    net = BACKBONES["conv"]().eval()
    full = fit_not_digit_detector(net, train, dm.split_tensors("val"), accept=0.9, fit=fit)
    before = {k: v.clone() for k, v in net.not_digit.state_dict().items()}
    # Leaving a family out fits on fewer not-digits: the 20 shapes fewer here.
    without = fit_not_digit_detector(net, train, dm.split_tensors("val"), 0.9, fit, leave_out=("shapes",))
    count = lambda fitted: int(re.search(r"(\d+) synthetic not-digits", fitted["fitted_on"])[1])  # noqa: E731
    assert count(full) - count(without) == 20, (full["fitted_on"], without["fitted_on"])
    net.not_digit.load_state_dict(before)
    report = unseen_families(
        net, train, dm.split_tensors("val"), dm.split_tensors("test"), 0.9, fit, per_kind=20, digits=50
    )
    for name, value in net.not_digit.state_dict().items():
        assert torch.equal(value, before[name]), name  # the checkpoint's detector, as it was
    assert list(report["not_digits_left_out"]) == list(NOT_DIGIT_KINDS)
    assert all(0 <= row["refused"] <= 1 for row in report["not_digits_left_out"].values())
    assert list(report["digit_renderings"]) == list(DIGIT_RENDERINGS)
    assert sum(row["images"] for row in report["digit_renderings"].values()) == 50
    for row in [*report["digit_renderings"].values(), report["mnist_test_files"]]:
        assert 0 <= row["accepted"] <= 1 and 0 <= row["accuracy_all"] <= 1
    curve = report["selective"]["all renderings"]
    assert curve[-1]["accepted"] == 1 and curve[-1]["accuracy"] == pytest.approx(
        sum(r["accuracy_all"] * r["images"] for r in report["digit_renderings"].values()) / 50
    )
    assert "mean over families" in format_unseen_families(report)
    # At the detector's threshold: the share accepted of all renderings, and their accuracy then.
    accepted, accuracy = operating_points(report)["all renderings"]
    rows = report["digit_renderings"].values()
    assert accepted == pytest.approx(sum(r["accepted"] * r["images"] for r in rows) / 50)
    correct = sum(r["accuracy_accepted"] * r["accepted"] * r["images"] for r in rows if r["accepted"])
    assert accuracy == pytest.approx(correct / (accepted * 50))


@pytest.mark.slow
def test_eval_measures_the_detector_on_families_it_was_not_fitted_to(
    calibrated_ckpt, real_data_dir, tmp_path
):
    from mnist_adder.evaluation.evaluate import evaluate

    run = tmp_path / "eval"
    overrides = [f"ckpt_path={calibrated_ckpt}", f"paths.data_dir={real_data_dir}", "not_digits_unseen=true"]
    evaluate(compose_config(overrides, run, config_name="eval"))
    report = json.loads((run / "not_digits_unseen.json").read_text())
    assert sorted(report["not_digits_left_out"]) == sorted(NOT_DIGIT_KINDS)  # the file's keys are sorted
    module, _ = load_checkpoint(calibrated_ckpt)
    assert report["threshold"] == pytest.approx(float(module.net.not_digit.threshold))
    # A model of 200 steps reads MNIST test files well and its detector accepts nearly all of them.
    assert report["mnist_test_files"]["accuracy_all"] > 0.9 and report["mnist_test_files"]["accepted"] > 0.9
    assert (run / "selective_prediction.png").is_file()
