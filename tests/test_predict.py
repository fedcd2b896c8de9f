"""scripts/predict.py: real MNIST digits saved as users' files are read as the model reads the tensors."""

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_adder.data import load_mnist, normalize
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.predict import (
    NotDigit,
    Prediction,
    image_paths,
    numbers_for,
    predict,
    predict_images,
)

from conftest import compose_config, save_letter, save_noise

ROOT = Path(__file__).resolve().parents[1]
PREDICTION_KEYS = ["image", "number", "digit", "digit_prob", "sum", "sum_prob"]
# Honest floor: a model trained for 200 steps agreed with itself on 97 % (enlarged) to 99.7 % (28x28)
# of 200 digits when they came as files; an error in polarity, crop or centring drops this far lower.
AGREEMENT_FLOOR = 0.93


def _gray(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels)


def _inverted_rgb(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(255 - pixels).convert("RGB")  # dark ink on white paper, in colour


def _enlarged_on_page(pixels: np.ndarray) -> Image.Image:
    page = Image.new("L", (200, 150), 255)  # 200x150 paper, the digit 5x larger and off centre
    page.paste(Image.fromarray(255 - pixels).resize((140, 140), Image.Resampling.BILINEAR), (45, 3))
    return page


FORMS: dict[str, tuple[Callable[[np.ndarray], Image.Image], str, dict]] = {
    "gray-png": (_gray, "png", {}),
    "inverted-rgb-png": (_inverted_rgb, "png", {}),
    "enlarged-offset-png": (_enlarged_on_page, "png", {}),
    "enlarged-offset-jpeg": (lambda p: _enlarged_on_page(p).convert("RGB"), "jpg", {"quality": 75}),
}


@pytest.fixture(scope="module")
def model_and_digits(trained_run, real_data_dir):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]
    module, _ = load_checkpoint(ckpt_path)
    images, _ = load_mnist(real_data_dir, train=False)
    pick = torch.arange(200) * 50  # spread over the test set
    return ckpt_path, module, images[pick]


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_images_as_files_are_read_like_the_tensors(model_and_digits, tmp_path, form):
    _, module, images = model_and_digits
    numbers = [i % 10 for i in range(len(images))]
    with torch.inference_mode():
        digit_logits, sum_logits = module(normalize(images).unsqueeze(1), torch.eye(10)[numbers])
    render, ext, options = FORMS[form]
    paths = []
    for i, pixels in enumerate(images.numpy()):
        paths.append(str(tmp_path / f"{i:03d}.{ext}"))
        render(pixels).save(paths[-1], **options)
    # Read, not refused: this compares the reading of files with the tensors, not what a 200-step model's
    # detector makes of each way of saving a digit (tests/test_not_digit.py measures that).
    predictions = predict_images(module, paths, numbers, threshold="off")
    assert all(isinstance(p, Prediction) for p in predictions)
    digits = torch.tensor([p.digit for p in predictions])
    sums = torch.tensor([p.sum for p in predictions])
    assert (digits == digit_logits.argmax(1)).float().mean() >= AGREEMENT_FLOOR
    assert (sums == sum_logits.argmax(1)).float().mean() >= AGREEMENT_FLOOR


def run_predict(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/predict.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_folder_in_json_keeps_the_good_results_and_reports_the_bad(model_and_digits, tmp_path):
    ckpt_path, module, images = model_and_digits
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        _inverted_rgb(images[i].numpy()).save(folder / f"digit_{i}.png")
    Image.new("L", (40, 40), 255).save(folder / "blank.png")
    (folder / "notes.png").write_text("not an image")  # named as one, but it is not
    result = run_predict(
        f"ckpt_path={ckpt_path}", f"image={folder}", "number=4", "format=json", "reject_threshold=off"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 of 5 images could not be read" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds JSON only
    assert [Path(line["image"]).name for line in lines] == [
        "blank.png",
        "digit_0.png",
        "digit_1.png",
        "digit_2.png",
        "notes.png",
    ]
    assert list(lines[0]) == ["image", "error"] and "no digit found" in lines[0]["error"]
    assert list(lines[4]) == ["image", "error"] and "not an image" in lines[4]["error"]
    with torch.inference_mode():
        digit_logits, _ = module(normalize(images[:3]).unsqueeze(1), torch.eye(10)[[4, 4, 4]])
    for line, expected in zip(lines[1:4], digit_logits.argmax(1).tolist(), strict=True):
        assert list(line) == [*PREDICTION_KEYS, "not_digit_score", "reject_threshold"]
        # reject_threshold=off: no score shown, nothing refused.
        assert line["not_digit_score"] is None and line["reject_threshold"] is None
        assert line["number"] == 4 and line["digit"] == expected and line["sum"] in range(19)
        assert 0 < line["digit_prob"] <= 1 and 0 < line["sum_prob"] <= 1


@pytest.mark.slow
def test_a_folder_of_digits_and_their_labels_file(model_and_digits, real_data_dir, tmp_path):
    # A user's folder: real MNIST test digits as PNG and JPEG, and the labels.csv that names them.
    ckpt_path, _, _ = model_and_digits
    images, labels = load_mnist(real_data_dir, train=False)
    folder = tmp_path / "digits"
    folder.mkdir()
    rows = {}
    for i in range(40):
        name = f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
        _inverted_rgb(images[7 * i].numpy()).save(folder / name, **({"quality": 90} if i % 2 == 0 else {}))
        rows[name] = int(labels[7 * i])
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},{d}\n" for n, d in rows.items()))

    # reject_threshold=off: this tests reading a folder; about 1 % of real digits are refused by design
    # (the threshold accepts 99 % of validation digits), which tests/test_not_digit.py measures.
    result = run_predict(
        f"ckpt_path={ckpt_path}", f"image={folder}", "number=3", "format=json", "reject_threshold=off"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error")]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {folder}: skipped 1 file that is not an image by extension: labels.csv"]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == sorted(rows)
    right = [line["digit"] == rows[Path(line["image"]).name] for line in lines]
    added = [line["sum"] == line["digit"] + 3 for line in lines]
    assert sum(right) >= 0.85 * len(lines) and sum(added) >= 0.85 * len(lines)

    # Named on its own, the labels file is still an error: one line, exit status 2.
    alone = run_predict(f"ckpt_path={ckpt_path}", f"image={folder / 'labels.csv'}", "number=3")
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    errors = [line for line in alone.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {folder / 'labels.csv'}: not an image (PNG, JPEG, or another format PIL reads)"
    ]


@pytest.mark.slow
def test_one_image_in_text(model_and_digits, tmp_path, capsys):
    ckpt_path, _, images = model_and_digits
    _gray(images[0].numpy()).save(tmp_path / "a.png")
    cfg = compose_config(
        [f"ckpt_path={ckpt_path}", f"image={tmp_path / 'a.png'}", "number=9"], None, "predict"
    )
    (prediction,) = predict(cfg)
    captured = capsys.readouterr()
    assert captured.out == prediction.as_text() + "\n" and captured.err == ""
    assert captured.out.startswith(f"{tmp_path / 'a.png'}: number 9 -> digit {prediction.digit} (")
    assert f"sum {prediction.sum} (" in captured.out


def test_predict_prints_each_image_and_fails_at_the_end_for_an_unreadable_one(tiny_run, tmp_path, capsys):
    # The fast version of the tests above, on a model of a few seconds (tiny_run): every step of the path
    # from a checkpoint and files to the printed lines; agreement with the tensors needs a real model.
    ckpt_path = json.loads((tiny_run / "metrics.json").read_text())["ckpt_path"]
    digit = ROOT / "examples" / "digits" / "seven_on_paper.png"
    (tmp_path / "notes.txt").write_text("not a picture\n")
    images = f"image=[{digit},{tmp_path / 'notes.txt'}]"
    cfg = compose_config([f"ckpt_path={ckpt_path}", images, "number=[4,2]", "format=json"], None, "predict")
    with pytest.raises(UserError, match="1 of 2 images could not be read"):
        predict(cfg)
    good, bad = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    module, _ = load_checkpoint(ckpt_path)
    with torch.inference_mode():
        digit_logits, sum_logits = module(preprocess_image(str(digit))[None], torch.eye(10)[[4]])
    digit_probs, sum_probs = digit_logits.softmax(-1)[0], sum_logits.softmax(-1)[0]
    assert good == {
        "image": str(digit),
        "number": 4,
        "digit": int(digit_probs.argmax()),
        "digit_prob": pytest.approx(float(digit_probs.max()), abs=1e-6),
        "sum": int(sum_probs.argmax()),
        "sum_prob": pytest.approx(float(sum_probs.max()), abs=1e-6),
        # tiny_run is trained with not_digit_accept=null: no detector, so no score and no threshold.
        "not_digit_score": None,
        "reject_threshold": None,
    }
    assert bad["image"] == str(tmp_path / "notes.txt") and bad["error"].startswith("not an image")


def test_numbers_one_for_all_or_one_each():
    assert numbers_for(3, 4) == [3, 3, 3, 3]
    assert numbers_for([1, 2], 2) == [1, 2]
    for bad in (10, -1, 2.5, "3", True, [1, 12]):
        with pytest.raises(UserError, match="0 to 9"):
            numbers_for(bad, 2)
    with pytest.raises(UserError, match="3 numbers for 2 images"):
        numbers_for([1, 2, 3], 2)
    with pytest.raises(UserError, match="no number"):
        numbers_for(None, 1)


def test_folders_expand_to_their_image_files_by_name(tmp_path, capsys):
    for name in ("b.png", "a.jpg", "c.JPEG", ".hidden.png", "labels.csv", "README"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert image_paths([str(tmp_path), "x.png", "y.txt"]) == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.png"),
        str(tmp_path / "c.JPEG"),
        "x.png",
        "y.txt",  # named on its own: read, and refused there if it is no image
    ]
    assert capsys.readouterr().err == (
        f"note: {tmp_path}: skipped 2 files that are not an image by extension: README, labels.csv\n"
    )
    with pytest.raises(UserError, match="no image given"):
        image_paths(None)
    with pytest.raises(UserError, match="holds no image files"):
        image_paths(str(tmp_path / "sub"))
    (tmp_path / "sub" / "labels.csv").write_text("file,label\n")
    with pytest.raises(UserError, match=r"holds no image files \(it holds 1 other file\)"):
        image_paths(str(tmp_path / "sub"))


# The digits the files of examples/digits show (examples/make_digits.py).
EXAMPLE_DIGITS = {"four_drawn.png": 4, "one_mnist.png": 1, "seven_on_paper.png": 7, "two_scan.jpg": 2}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A folder of a noise image, a typed letter and the example digits (copied)."""
    folder = tmp_path_factory.mktemp("mixed")
    save_noise(folder / "noise.png")
    save_letter(folder / "letter_w.png")
    for name in EXAMPLE_DIGITS:
        (folder / name).write_bytes((ROOT / "examples" / "digits" / name).read_bytes())
    return folder


@pytest.mark.slow  # trained_run: a real MNIST training with its detector
def test_noise_and_a_letter_are_refused_and_real_digits_read(handed_over_ckpt, mixed_folder):
    result = run_predict(f"ckpt_path={handed_over_ckpt}", f"image={mixed_folder}", "number=3")
    assert result.returncode == 0, result.stderr[-3000:]  # refusals are results, not errors
    assert "Traceback" not in result.stderr and "error" not in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert sorted(Path(p).name for p in lines) == sorted(["noise.png", "letter_w.png", *EXAMPLE_DIGITS])
    for name in ("noise.png", "letter_w.png"):
        text = lines[str(mixed_folder / name)]
        assert re.fullmatch(
            r"not a digit \(score (-?[\d.]+) > threshold (-?[\d.]+)\): does not look like a handwritten "
            r"digit to this model; no digit or sum given",
            text,
        ), text
    for name, digit in EXAMPLE_DIGITS.items():
        assert lines[str(mixed_folder / name)].startswith(f"number 3 -> digit {digit} ("), name
        assert f"sum {digit + 3} (" in lines[str(mixed_folder / name)]

    as_json = run_predict(f"ckpt_path={handed_over_ckpt}", f"image={mixed_folder}", "number=3", "format=json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    results = {Path(r["image"]).name: r for r in map(json.loads, as_json.stdout.splitlines())}
    module, _ = load_checkpoint(handed_over_ckpt)
    threshold = round(float(module.net.not_digit.threshold), 4)
    for name in ("noise.png", "letter_w.png"):
        refused = results[name]
        assert list(refused) == [*PREDICTION_KEYS, "not_digit_score", "reject_threshold", "reason"]
        assert [refused[k] for k in ("digit", "digit_prob", "sum", "sum_prob")] == [None] * 4
        assert refused["reject_threshold"] == threshold and refused["not_digit_score"] > threshold
        assert refused["reason"] == lines[str(mixed_folder / name)]
    for name, digit in EXAMPLE_DIGITS.items():
        read = results[name]
        assert list(read) == [*PREDICTION_KEYS, "not_digit_score", "reject_threshold"]
        assert (read["digit"], read["sum"]) == (digit, digit + 3)
        assert read["not_digit_score"] <= read["reject_threshold"] == threshold


@pytest.mark.slow  # trained_run: a real MNIST training with its detector
def test_reject_threshold_overrides_the_stored_one(handed_over_ckpt, mixed_folder):
    module, _ = load_checkpoint(handed_over_ckpt)
    paths = [str(mixed_folder / "noise.png"), str(mixed_folder / "seven_on_paper.png")]
    stored = predict_images(module, paths, [1, 1])
    assert [type(r) for r in stored] == [NotDigit, Prediction]
    # off, or false: nothing is refused, and no score is given.
    for off in ("off", False):
        read = predict_images(module, paths, [1, 1], threshold=off)
        assert all(isinstance(r, Prediction) and r.not_digit_score is None for r in read)
    # A number: that threshold; here one above the noise's score and one below the digit's.
    noise_score, digit_score = stored[0].not_digit_score, stored[1].not_digit_score
    assert all(
        isinstance(r, Prediction) for r in predict_images(module, paths, [1, 1], threshold=noise_score + 1)
    )
    low = predict_images(module, paths, [1, 1], threshold=digit_score - 1)
    assert all(isinstance(r, NotDigit) and r.reject_threshold == round(digit_score - 1, 4) for r in low)
    result = run_predict(
        f"ckpt_path={handed_over_ckpt}",
        f"image={paths[0]}",
        "number=1",
        "reject_threshold=off",
        "format=json",
    )
    assert result.returncode == 0 and json.loads(result.stdout)["digit"] in range(10)
