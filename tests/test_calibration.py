"""Calibration: ECE in the test metrics, temperature scaling stored with the model (by training itself, by
default, and by scripts/calibrate.py for older checkpoints), reliability diagrams."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_adder.cli import guarded
from mnist_adder.data import MNIST_MEAN, MNIST_STD, MnistSumDataModule
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.evaluation.evaluate import evaluate
from mnist_adder.inference.calibrate import calibrate, calibrated_path
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.export import export_onnx, export_torchscript
from mnist_adder.inference.predict import Prediction, predict_images
from mnist_adder.models.digit_sum import TEMPERATURES
from mnist_adder.postfit.store import write_fitted_checkpoint
from mnist_adder.postfit.temperature import CHANGED_BY_TEMPERATURE, collect_logits, fit_temperature, nll
from mnist_adder.training.metrics import expected_calibration_error, reliability_bins
from mnist_adder.training.train import train

from conftest import compose_config, require_extra, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(trained_run: Path) -> str:
    return json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]


def _raw(ckpt_path: str | Path):
    """The model of a checkpoint at temperature 1: its raw logits."""
    module, _ = load_checkpoint(ckpt_path)
    module.net.set_temperatures(1.0, 1.0)
    return module


@pytest.fixture(scope="module")
def calibrated(trained_run, real_data_dir, tmp_path_factory):
    """A copy of the trained checkpoint (so nothing is written into the shared run), calibrated."""
    folder = tmp_path_factory.mktemp("calibrated")
    original = folder / "best.ckpt"
    shutil.copy(_ckpt(trained_run), original)
    cfg = compose_config(
        # The temperatures alone: the detector calibrate.py also fits is tested in tests/test_not_digit.py.
        [f"ckpt_path={original}", f"paths.data_dir={real_data_dir}", "not_digit_accept=null"],
        folder / "run",
        config_name="calibrate",
    )
    summary = calibrate(cfg)
    return original, Path(summary["calibrated_ckpt_path"]), summary


@pytest.fixture(scope="module")
def val_batches(trained_run, real_data_dir):
    _, config = load_checkpoint(_ckpt(trained_run))
    datamodule = MnistSumDataModule(
        data_dir=real_data_dir, val_size=config.data.val_size, split_seed=config.data.split_seed
    )
    datamodule.setup("fit")
    return list(datamodule.val_dataloader())


@pytest.mark.slow
def test_ece_is_a_test_metric_of_training_and_eval_alike(trained_run, real_data_dir, tmp_path):
    trained = json.loads((trained_run / "metrics.json").read_text())
    run_dir = tmp_path / "eval"
    evaluated = evaluate(
        compose_config(
            [f"ckpt_path={trained['ckpt_path']}", f"paths.data_dir={real_data_dir}"],
            run_dir,
            config_name="eval",
        )
    )
    for head in ("digit", "sum"):
        key = f"test/{head}_ece"
        # Training hands over the calibrated checkpoint: eval tests it, and finds its calibrated ECE.
        assert 0 < trained[key] < 1 and evaluated[key] == trained[key], key
        assert evaluated[key] != trained[f"{key}_uncalibrated"], key
        bins = evaluated[f"test/{head}_reliability"]
        assert len(bins["count"]) == 15 and sum(bins["count"]) == 10_000  # every test image in one bin
        assert all(0 <= a <= 1 for a in bins["accuracy"])
        # The diagram's bins are the metric's samples: ECE from them is the metric's, except that
        # torchmetrics keeps confidences of exactly 1 in a bin of their own (merging two bins can only
        # lower the weighted gap).
        gaps = zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        ece = sum(n * abs(a - c) for n, a, c in gaps) / 10_000
        assert trained[key] - 0.01 <= ece <= trained[key] + 5e-4  # (and a bin edge may round apart)
        with Image.open(run_dir / f"reliability_{head}.png") as picture:
            assert picture.mode in ("RGB", "RGBA") and min(picture.size) > 200
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"test/digit_reliability", "test/sum_reliability"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_training_hands_over_a_calibrated_checkpoint_whose_ece_beats_the_raw_ones(trained_run):
    # trained_run: the default model (label smoothing 0.1) for 2 x 100 steps of real MNIST, calibrate=true.
    trained = json.loads((trained_run / "metrics.json").read_text())
    handed_over = Path(trained["ckpt_path"])
    # The selected checkpoint itself carries the temperatures (no copy beside it).
    assert handed_over.parent == (trained_run / "checkpoints").resolve()
    assert handed_over.name.startswith("epoch_") and not list(handed_over.parent.glob("*.calibrated.ckpt"))
    stored = torch.load(handed_over, weights_only=True)
    module, _ = load_checkpoint(handed_over)
    assert module.net.temperatures() == (trained["digit_temperature"], trained["sum_temperature"])
    for head in ("digit", "sum"):
        assert trained[f"test/{head}_ece"] < trained[f"test/{head}_ece_uncalibrated"], head
        assert stored["calibration"][head]["temperature"] == trained[f"{head}_temperature"], head
    assert stored["calibration"]["fitted_on"].startswith("validation split (5000 images")
    # last.ckpt, the state to resume from, stays the raw model that training left.
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "calibration" not in last
    assert all(float(last["state_dict"][f"net.{name}"]) == 1.0 for name in TEMPERATURES)


def test_calibrate_false_hands_over_the_raw_model_of_the_same_training(tiny_mnist, tmp_path):
    overrides = [*tiny_train_overrides(tiny_mnist), "trainer.max_epochs=1"]
    on = train(compose_config(overrides, tmp_path / "on"))
    off = train(compose_config([*overrides, "calibrate=false"], tmp_path / "off"))
    on_ckpt, off_ckpt = (torch.load(r["ckpt_path"], weights_only=True) for r in (on, off))

    # Off: no temperatures, and nothing to compare them with.
    assert (off["digit_temperature"], off["sum_temperature"]) == (1.0, 1.0)
    assert not [key for key in off if key.endswith("_uncalibrated")] and "calibration" not in off_ckpt
    assert all(float(off_ckpt["state_dict"][f"net.{name}"]) == 1.0 for name in TEMPERATURES)

    # On: the same training and selected checkpoint, with the temperatures fitted after it.
    assert Path(on["ckpt_path"]).name == Path(off["ckpt_path"]).name
    assert (on["digit_temperature"], on["sum_temperature"]) != (1.0, 1.0)
    for name, value in off_ckpt["state_dict"].items():
        if name.removeprefix("net.") in TEMPERATURES:
            assert float(on_ckpt["state_dict"][name]) == on[name.removeprefix("net.")]
        else:
            assert torch.equal(on_ckpt["state_dict"][name], value), name
    # The raw weights kept for resuming (weight averaging is on) are left as they were.
    assert all(
        torch.equal(on_ckpt["current_model_state"][k], v) for k, v in off_ckpt["current_model_state"].items()
    )
    # The *_uncalibrated keys are the raw model's test; argmax metrics are the same with and without.
    for name in CHANGED_BY_TEMPERATURE:
        assert on[f"test/{name}_uncalibrated"] == off[f"test/{name}"], name
    for key in ("test/digit_acc", "test/sum_acc", "test/both_acc", "test/sum_given_digit_acc"):
        assert on[key] == off[key], key
    assert on["test/digit_acc_per_class"] == off["test/digit_acc_per_class"]


def test_a_full_disk_leaves_the_checkpoint_as_it_was(tmp_path, monkeypatch):
    module = hydra.utils.instantiate(compose_config([]).model)
    selected = tmp_path / "epoch_001.ckpt"
    torch.save({"state_dict": module.state_dict()}, selected)
    before = selected.read_bytes()
    module.net.set_temperatures(0.5, 0.5)

    def disk_full(*args, **kwargs):  # a full disk cannot be made here
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=f"could not write {selected}: No space left on device"):
        write_fitted_checkpoint(selected, selected, module, {"calibration": {}})
    assert selected.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [selected.name]


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator) * 4
    labels = torch.multinomial((logits / 2.5).softmax(dim=-1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    assert nll(logits, labels, temperature) < nll(logits, labels)
    # Over-confident logits: scaling them makes the ECE much smaller.
    assert expected_calibration_error(logits / temperature, labels) < 0.5 * expected_calibration_error(
        logits, labels
    )


def test_reliability_bins_count_every_sample_once():
    confidences = torch.tensor([0.05, 0.5, 0.51, 0.99, 1.0])
    bins = reliability_bins(confidences, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]), n_bins=10)
    assert bins["count"] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 2]  # 1.0 falls into the last bin
    assert bins["accuracy"][5] == 0.5 and bins["confidence"][9] == pytest.approx(0.995)


@pytest.mark.slow
def test_temperatures_fitted_on_validation_lower_its_nll_and_change_no_prediction(
    calibrated, val_batches, trained_run
):
    original, calibrated_file, summary = calibrated
    assert (
        calibrated_file
        == calibrated_path(original)
        == original.with_name("best.ckpt".replace(".ckpt", ".calibrated.ckpt"))
    )
    trained = json.loads((trained_run / "metrics.json").read_text())
    for head in ("digit", "sum"):
        s = summary[head]
        assert s["temperature"] != 1.0 and s["val_nll_after"] < s["val_nll_before"], head
        assert 0 <= s["test_ece_after"] <= 1 and 0 <= s["test_ece_before"] <= 1
        # Given training's calibrated checkpoint, it refits from the raw logits: the one fitting step
        # finds what training found, and the test numbers training wrote before and after.
        assert s["temperature"] == pytest.approx(trained[f"{head}_temperature"], rel=1e-5), head
        assert s["test_ece_before"] == trained[f"test/{head}_ece_uncalibrated"], head
        assert s["test_ece_after"] == pytest.approx(trained[f"test/{head}_ece"], abs=1e-5), head
    raw_module = _raw(original)
    module, _ = load_checkpoint(calibrated_file)
    assert module.net.temperatures() == pytest.approx(
        (summary["digit"]["temperature"], summary["sum"]["temperature"])
    )
    raw, scaled = collect_logits(raw_module.net, val_batches), collect_logits(module.net, val_batches)
    for head, key in (("digit", "digit_logits"), ("sum", "sum_logits")):
        # Only the output is divided: with adder_input=softmax the sum is computed from the raw digit.
        assert torch.equal(raw[key].argmax(dim=1), scaled[key].argmax(dim=1)), head
        assert torch.allclose(scaled[key], raw[key] / summary[head]["temperature"], atol=1e-5)
    # The user's file is untouched; the calibrated one records where it came from.
    assert original.read_bytes() == Path(_ckpt(trained_run)).read_bytes()
    stored = torch.load(calibrated_file, weights_only=True)
    assert stored["calibration"]["source"] == str(original.resolve())


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["training", "calibrate_script"])
def test_calibrated_checkpoint_gives_calibrated_probabilities_everywhere(
    made_by, trained_run, calibrated, real_data_dir, tmp_path
):
    if made_by == "training":  # the checkpoint a training run hands over (calibrate=true, the default)
        trained = json.loads((trained_run / "metrics.json").read_text())
        calibrated_file = trained["ckpt_path"]
        t_digit, t_sum = trained["digit_temperature"], trained["sum_temperature"]
    else:
        _, calibrated_file, summary = calibrated
        t_digit, t_sum = summary["digit"]["temperature"], summary["sum"]["temperature"]
    raw_module = _raw(calibrated_file)
    module, _ = load_checkpoint(calibrated_file)
    assert module.net.temperatures() == pytest.approx((t_digit, t_sum)) and t_digit != 1 and t_sum != 1
    datamodule = MnistSumDataModule(data_dir=real_data_dir)
    datamodule.setup("test")
    image, number_onehot, _, _ = next(iter(datamodule.test_dataloader()))
    image, number_onehot = image[:300], number_onehot[:300]
    with torch.inference_mode():
        raw_digit, raw_sum = raw_module(image, number_onehot)
    expected_digit, expected_sum = (raw_digit / t_digit).softmax(1), (raw_sum / t_sum).softmax(1)

    # predict (and the demo, which predicts through it) reports the calibrated probability of the
    # image as preprocessed, and the same digit and sum as the raw model.
    paths = []
    for i in range(5):
        pixels = ((image[i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1) * 255).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    numbers = number_onehot[:5].argmax(1).tolist()
    raw_files, scaled_files = (predict_images(m, paths, numbers) for m in (raw_module, module))
    read = torch.stack([preprocess_image(path) for path in paths])
    with torch.inference_mode():
        read_digit, read_sum = raw_module(read, number_onehot[:5])
    for k, (raw_p, p) in enumerate(zip(raw_files, scaled_files, strict=True)):
        assert isinstance(p, Prediction) and (p.digit, p.sum) == (raw_p.digit, raw_p.sum)
        assert p.digit_prob == pytest.approx(float((read_digit[k] / t_digit).softmax(0).max()), abs=1e-5)
        assert p.sum_prob == pytest.approx(float((read_sum[k] / t_sum).softmax(0).max()), abs=1e-5)

    # TorchScript and ONNX carry the temperatures as constants.
    traced = torch.jit.load(str(export_torchscript(module.net.eval(), tmp_path / "net.pt")))
    with torch.inference_mode():
        ts_digit, ts_sum = traced(image, number_onehot)
    assert torch.allclose(ts_digit.softmax(1), expected_digit, atol=1e-5)
    assert torch.allclose(ts_sum.softmax(1), expected_sum, atol=1e-5)
    ort = require_extra("onnxruntime", "export")
    session = ort.InferenceSession(
        str(export_onnx(module.net.eval(), tmp_path / "net.onnx")), providers=["CPUExecutionProvider"]
    )
    onnx_digit, onnx_sum = session.run(None, {"image": image.numpy(), "number_onehot": number_onehot.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_digit).softmax(1), expected_digit, atol=1e-4)
    assert torch.allclose(torch.from_numpy(onnx_sum).softmax(1), expected_sum, atol=1e-4)


@pytest.mark.slow
def test_a_checkpoint_from_before_temperatures_still_loads(trained_run, tmp_path):
    checkpoint = torch.load(_ckpt(trained_run), weights_only=True)
    for key in ("net.digit_temperature", "net.sum_temperature"):
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old, _ = load_checkpoint(tmp_path / "old.ckpt")
    current = _raw(_ckpt(trained_run))
    assert old.net.temperatures() == (1.0, 1.0)
    image, number_onehot = torch.randn(8, 1, 28, 28), torch.eye(10)[torch.arange(8)]
    with torch.inference_mode():
        for a, b in zip(old(image, number_onehot), current(image, number_onehot), strict=True):
            assert torch.equal(a, b)


def test_calibrating_a_tiny_run_stores_the_fitted_temperatures_in_a_copy(tiny_run, tiny_mnist, tmp_path):
    # The fast version of the tests above (tiny_run: a model of a few seconds on tiny MNIST).
    original = tmp_path / "best.ckpt"  # a copy: the calibrated file goes beside it, not into the shared run
    shutil.copy(_ckpt(tiny_run), original)
    cfg = compose_config(
        [
            f"ckpt_path={original}",
            f"paths.data_dir={tiny_mnist}",
            "not_digit_accept=null",
        ],  # temperatures alone
        tmp_path / "run",
        config_name="calibrate",
    )
    summary = calibrate(cfg)
    assert summary["calibrated_ckpt_path"] == str(calibrated_path(original))
    assert json.loads((tmp_path / "run" / "calibration.json").read_text()) == summary
    module, _ = load_checkpoint(summary["calibrated_ckpt_path"])
    for head in ("digit", "sum"):
        fitted = summary[head]
        assert fitted["temperature"] > 0 and fitted["val_nll_after"] <= fitted["val_nll_before"] + 1e-6
        assert getattr(module.net, f"{head}_temperature").item() == pytest.approx(fitted["temperature"])


def test_calibrate_without_a_real_checkpoint_is_one_error_line(tmp_path, capsys):
    cfg = compose_config(
        [f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "run", config_name="calibrate"
    )
    with pytest.raises(SystemExit) as exit_info:
        guarded(calibrate, cfg)
    stderr = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and stderr.startswith("error: checkpoint ") and "does not exist" in stderr
    )
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_calibrate_script_exits_2_on_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/calibrate.py",
            f"ckpt_path={tmp_path / 'nope.ckpt'}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
