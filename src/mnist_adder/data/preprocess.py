"""A user's image of a handwritten digit made to look like MNIST, then normalised as in training.

MNIST digits are light ink on a black background, fitted into a 20x20 box (aspect ratio kept) and
placed on 28x28 so that their centre of mass is at the centre (pixel 14, 14). A photo or scan is
brought to that form: grayscale, background to black, cropped to the ink, fitted, centred, and then
normalised by the one `normalize` training uses.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_adder.data.mnist import normalize
from mnist_adder.errors import UserError

SIZE, BOX = 28, 20
# Ink fainter than this share of the darkest stroke is paper texture or compression noise: it neither
# counts for the crop nor stays in the digit.
NOISE_FLOOR = 0.15
# An image whose ink differs from its background by fewer gray levels than this holds no digit.
MIN_CONTRAST = 32.0


def is_image_name(path: str | Path) -> bool:
    """Whether the file's extension is one of a format PIL opens (.png, .jpg, .jpeg, .bmp, .tif, ...).

    What a folder of images means: its image files. A file named alone is read whatever its name.
    """
    Image.init()  # registers every plugin, so the table holds all of PIL's formats
    return Image.registered_extensions().get(Path(path).suffix.lower()) in Image.OPEN


def read_grayscale(path: str | Path) -> np.ndarray:
    """Gray levels 0..255 (float32 [H, W]) of a PNG, JPEG or any image PIL reads; a UserError if it can't.

    Error messages do not name the file: the caller, which knows how the user named it, does.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("it is a folder, not an image file" if path.is_dir() else "no such file")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos: upright as the user saw them
            image.load()
    except UnidentifiedImageError as err:
        raise UserError("not an image (PNG, JPEG, or another format PIL reads)") from err
    except Exception as err:  # a truncated or corrupt file fails in many ways inside the decoders
        raise UserError(f"the image cannot be decoded ({type(err).__name__}: {err})") from err
    return to_grayscale(image)


def to_grayscale(image: Image.Image | np.ndarray) -> np.ndarray:
    """Gray levels 0..255 (float32 [H, W]) of an image in memory: a PIL image, or a uint8 array [H, W],
    [H, W, 3] or [H, W, 4] (RGBA, as a drawing in the demo arrives). Files come here through
    `read_grayscale`, so a drawing and a file are read alike."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        image = _flatten_transparency(image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32)


def _flatten_transparency(rgba: Image.Image) -> Image.Image:
    # Transparent pixels become background: a background that contrasts with the visible ink.
    pixels = np.asarray(rgba, dtype=np.float32)
    opaque = pixels[..., 3] > 127
    ink_level = pixels[..., :3][opaque].mean() if opaque.any() else 0.0
    background = (255, 255, 255, 255) if ink_level < 128 else (0, 0, 0, 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("RGB")


def _border(gray: torch.Tensor) -> torch.Tensor:
    return torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def to_mnist_pixels(gray: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Gray levels [H, W] (0..255, any size, either polarity) -> MNIST-like uint8 pixels [28, 28]."""
    gray = torch.as_tensor(np.asarray(gray, dtype=np.float32))
    # The border is (nearly all) background, even where a stroke touches it: its median is the paper.
    background = _border(gray).median()
    if background > 127.5:  # dark ink on light paper: invert to MNIST's light ink on black
        gray, background = 255.0 - gray, 255.0 - background
    ink = (gray - background).clamp(min=0)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise UserError(
            f"no digit found: the image is empty or blank (no ink stands out from the background by more "
            f"than {peak:.0f} of 255 gray levels)."
        )
    ink = ((ink / peak - NOISE_FLOOR) / (1 - NOISE_FLOOR)).clamp(min=0)

    rows, cols = ink.any(dim=1).nonzero().squeeze(1), ink.any(dim=0).nonzero().squeeze(1)
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    # Antialiased resampling, as MNIST's digits were antialiased when they were fitted into 20x20.
    digit = F.interpolate(digit[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)
    digit = digit[0, 0].clamp(0, 1)
    digit = digit / digit.max()  # a thin pen stroke shrunk from a large photo keeps MNIST's full-white core

    # Place the centre of mass at pixel (14, 14), by whole pixels as MNIST did, keeping the box inside.
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    mass = digit.sum()
    center_y, center_x = (digit.sum(dim=1) @ ys) / mass, (digit.sum(dim=0) @ xs) / mass
    top = min(max(round(SIZE / 2 - float(center_y)), 0), SIZE - size[0])
    left = min(max(round(SIZE / 2 - float(center_x)), 0), SIZE - size[1])
    canvas = torch.zeros(SIZE, SIZE)
    canvas[top : top + size[0], left : left + size[1]] = digit
    return (canvas * 255).round().to(torch.uint8)


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """MNIST-like uint8 pixels [28, 28] -> the model's input [1, 28, 28], normalised as in training."""
    return normalize(pixels).unsqueeze(0)


def preprocess_image(path: str | Path) -> torch.Tensor:
    """A user's image file -> the model's input [1, 28, 28]: MNIST-like, normalised as in training."""
    return to_model_input(to_mnist_pixels(read_grayscale(path)))


def preprocess_array(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An image in memory (see `to_grayscale`) -> the model's input [1, 28, 28], as `preprocess_image`."""
    return to_model_input(to_mnist_pixels(to_grayscale(image)))
