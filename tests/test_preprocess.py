"""Users' images made MNIST-like: polarity, size and position do not matter; bad files are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_adder.data import load_mnist, normalize
from mnist_adder.data.preprocess import preprocess_image, read_grayscale, to_mnist_pixels
from mnist_adder.errors import UserError


def seven(height: int = 120, width: int = 90, thickness: int = 12) -> np.ndarray:
    """A thick '7' as dark ink on white paper, gray levels [height, width]."""
    image = np.full((height, width), 250.0, dtype=np.float32)
    image[10 : 10 + thickness, 10 : width - 10] = 20  # the bar
    for y in range(10, height - 10):  # the stem, slanting left as it goes down
        x = int(width - 10 - thickness - (y - 10) * (width - 40) / (height - 20))
        image[y, x : x + thickness] = 20
    return image


def center_of_mass(pixels: torch.Tensor) -> tuple[float, float]:
    weights = pixels.float()
    idx = torch.arange(28, dtype=torch.float32)
    return float(weights.sum(1) @ idx / weights.sum()), float(weights.sum(0) @ idx / weights.sum())


def test_digit_is_fitted_into_20x20_and_centred_by_mass():
    pixels = to_mnist_pixels(seven())
    assert pixels.shape == (28, 28) and pixels.dtype == torch.uint8
    ink = pixels > 0
    rows, cols = ink.any(1).nonzero().squeeze(1), ink.any(0).nonzero().squeeze(1)
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == 20  # the longer side fills the box
    cy, cx = center_of_mass(pixels)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # whole-pixel shifts, as MNIST
    assert pixels.max() == 255 and pixels[0].sum() == 0  # full-white ink on a black background


def test_light_and_dark_paper_give_the_same_digit():
    image = seven()
    assert torch.equal(to_mnist_pixels(image), to_mnist_pixels(255 - image))


def test_size_and_position_do_not_matter():
    digit = seven()
    twice = Image.fromarray(digit.astype(np.uint8)).resize((180, 240), Image.Resampling.BILINEAR)
    page = np.full((500, 400), 250.0, dtype=np.float32)
    page[230:470, 20:200] = np.asarray(twice)  # twice the size, in a corner of a larger page
    small, large = to_mnist_pixels(digit).float(), to_mnist_pixels(page).float()
    assert (small - large).abs().mean() < 4  # of 255 (measured: 1.2): the same digit up to resampling


def test_mnist_digits_stay_as_they_are(real_data_dir):
    images, _ = load_mnist(real_data_dir, train=False)
    originals = images[:200]
    redone = torch.stack([to_mnist_pixels(image.numpy()) for image in originals])
    # Already fitted and centred: only resampling and the noise floor change them (measured: 3.1 of 255).
    assert (redone.float() - originals.float()).abs().mean() < 6


def test_preprocess_image_normalises_like_training(tmp_path):
    path = tmp_path / "seven.png"
    Image.fromarray(seven().astype(np.uint8)).save(path)
    tensor = preprocess_image(path)
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0], normalize(to_mnist_pixels(seven())))


def test_transparent_background_is_background(tmp_path):
    ink = seven() < 128
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[ink] = (10, 10, 10, 255)  # dark ink, everything else transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "seven.png")
    assert (preprocess_image(tmp_path / "seven.png")[0] > 0).any()
    on_white = np.where(ink, 10, 255).astype(np.float32)
    assert torch.equal(to_mnist_pixels(read_grayscale(tmp_path / "seven.png")), to_mnist_pixels(on_white))


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda p: p, "no such file"),
        (lambda p: p.mkdir() or p, "folder"),
        (lambda p: p.write_text("hello") and p, "not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:60]) and p, "cannot be decoded"),
        (lambda p: Image.new("L", (64, 48), 255).save(p, format="PNG") or p, "no digit found"),
        (lambda p: Image.new("RGB", (64, 48), (30, 30, 30)).save(p, format="JPEG") or p, "no digit found"),
    ],
    ids=["missing", "folder", "text", "truncated-png", "blank-white", "blank-dark-jpeg"],
)
def test_bad_images_give_a_clear_error(tmp_path, write, message):
    with pytest.raises(UserError, match=message):
        preprocess_image(write(tmp_path / "digit.png"))


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(seven().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
