"""Images that are not digits, and real digits photographed, both as a user would hand them in.

The measurement of "not a digit" (`mnist_adder.evaluation.not_digit`) needs two sides, built here from a
seed, the same on every run on the same machine:

- not digits: uniform and Gaussian noise, scribbles (random smooth strokes), shapes (circles, rectangles,
  lines, triangles; outlined or filled) and letters A-Z, a-z rendered from the fonts on the machine
  (`fc-list`; PIL's built-in font where there are none). Letters that look like digits (O, l, I, S, Z,
  B, G, b, g, q, ...) are in the set like any other: a detector that accepts them is counted as wrong.
- digits: MNIST test digits re-rendered as photos and scans: dark ink on white paper enlarged and off
  centre, on gray paper as JPEG, in coloured ink on noisy, slightly rotated and blurred paper as JPEG.
- digits that do not look like MNIST's (`digit_rendering_set`): typed in a font, shrunk to 8..14 px and
  enlarged again (a thumbnail or a low-resolution scan), with thicker or thinner strokes, and small and
  off centre on a large page.

Each is drawn as a page of its own size and polarity (dark ink on light paper or light on dark), then
made MNIST-like by the one preprocessing of `predict` (`mnist_adder.data.preprocess`), so the model sees
them exactly as it sees a user's file. A page that preprocessing refuses (no ink) is counted, not kept.

The letters depend on the fonts installed: another machine may give other glyphs. `fonts` of the set
names the ones used.
"""

import io
import math
import string
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from mnist_adder.data.preprocess import to_grayscale, to_mnist_pixels
from mnist_adder.errors import UserError

NOT_DIGIT_KINDS = ("uniform_noise", "gaussian_noise", "scribbles", "shapes", "letters")
DIGIT_PHOTO_FORMS = ("paper", "scan", "photo")
# Digits drawn unlike MNIST's (`digit_rendering_set`): the detector must accept them, and none is fitted.
DIGIT_RENDERINGS = ("typed", "low_resolution", "thick", "thin", "small_off_centre")
LETTERS = string.ascii_uppercase + string.ascii_lowercase
SHAPES = ("circle", "rectangle", "line", "triangle")
# What PIL draws when the machine has no font files: its built-in scalable font (Pillow >= 10.1).
DEFAULT_FONT = "PIL built-in font"
FONT_SUFFIXES = (".ttf", ".otf")

Rng = np.random.Generator


@dataclass
class ImageSet:
    """MNIST-like pixels [N, 28, 28] (uint8, after preprocessing), with the kind and a short description
    of each image, and per kind how many pages preprocessing refused as blank."""

    pixels: torch.Tensor
    kinds: list[str]
    descriptions: list[str]
    refused_by_preprocessing: dict[str, int] = field(default_factory=dict)
    fonts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.kinds)


def font_files() -> list[str]:
    """The scalable font files on this machine (TrueType, OpenType), by path, as `fc-list` names them;
    empty where fontconfig is missing or finds none."""
    try:
        listed = subprocess.run(
            ["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line for line in listed.splitlines() if line.lower().endswith(FONT_SUFFIXES)})


def _font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size) if path == DEFAULT_FONT else ImageFont.truetype(path, size)


def _paper_and_ink(rng: Rng) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Paper and ink colours: mostly dark ink on light paper, sometimes light on dark, as users' images
    come (preprocessing turns both into light ink on black)."""
    light = tuple(int(v) for v in rng.integers(200, 256, 3))
    dark = tuple(int(v) for v in rng.integers(0, 80, 3))
    return (light, dark) if rng.random() < 0.7 else (dark, light)


def _page_size(rng: Rng, low: int = 48, high: int = 220) -> tuple[int, int]:
    return int(rng.integers(low, high)), int(rng.integers(low, high))


def _as_saved(page: Image.Image, rng: Rng, jpeg_share: float = 0.5) -> Image.Image:
    """The page as a user's file holds it: PNG (unchanged) or JPEG of a random quality."""
    if rng.random() >= jpeg_share:
        return page
    buffer = io.BytesIO()
    page.convert("RGB").save(buffer, format="JPEG", quality=int(rng.integers(50, 95)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def uniform_noise(rng: Rng) -> tuple[Image.Image, str]:
    """Every pixel uniform in 0..255, gray or coloured, 28x28 or larger."""
    width, height = _page_size(rng, 28, 128)
    channels = 3 if rng.random() < 0.5 else 1
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels), f"{width}x{height}"


def gaussian_noise(rng: Rng) -> tuple[Image.Image, str]:
    """Gray noise around a random level, sigma 30..80 gray levels, sometimes smoothed a little."""
    width, height = _page_size(rng, 28, 128)
    level, sigma = rng.uniform(60, 200), rng.uniform(30, 80)
    page = Image.fromarray(np.clip(rng.normal(level, sigma, (height, width)), 0, 255).astype(np.uint8))
    blur = float(rng.choice([0.0, 0.0, 0.7, 1.2]))
    if blur:
        page = page.filter(ImageFilter.GaussianBlur(blur))
    return page, f"{width}x{height} level {level:.0f} sigma {sigma:.0f} blur {blur}"


def _smooth_path(rng: Rng, width: int, height: int) -> list[tuple[float, float]]:
    """A random smooth pen path: a walk whose heading turns a little at every step."""
    x, y = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    heading, turn = rng.uniform(0, 2 * math.pi), rng.normal(0, 0.4)
    step = min(width, height) * rng.uniform(0.04, 0.1)
    points = [(x, y)]
    for _ in range(int(rng.integers(8, 40))):
        turn = 0.8 * turn + rng.normal(0, 0.35)
        heading += turn
        x = float(np.clip(x + step * math.cos(heading), 0.05 * width, 0.95 * width))
        y = float(np.clip(y + step * math.sin(heading), 0.05 * height, 0.95 * height))
        points.append((x, y))
    return points


def scribbles(rng: Rng) -> tuple[Image.Image, str]:
    """One to four random smooth strokes of a pen, as a scribble or a doodle."""
    paper, ink = _paper_and_ink(rng)
    width, height = _page_size(rng)
    page = Image.new("RGB", (width, height), paper)
    pen = ImageDraw.Draw(page)
    strokes = int(rng.integers(1, 5))
    thickness = max(1, int(min(width, height) * rng.uniform(0.02, 0.08)))
    for _ in range(strokes):
        pen.line(_smooth_path(rng, width, height), fill=ink, width=thickness, joint="curve")
    return _as_saved(page, rng), f"{strokes} stroke{'s' * (strokes > 1)}, width {thickness}"


def _random_box(rng: Rng, width: int, height: int) -> tuple[float, float, float, float]:
    w, h = rng.uniform(0.3, 0.8) * width, rng.uniform(0.3, 0.8) * height
    left, top = rng.uniform(0.05 * width, 0.95 * width - w), rng.uniform(0.05 * height, 0.95 * height - h)
    return left, top, left + w, top + h


def shapes(rng: Rng, shape: str | None = None) -> tuple[Image.Image, str]:
    """A circle (or ellipse), rectangle, line or triangle, outlined or filled, at a random place."""
    shape = shape or str(rng.choice(SHAPES))
    paper, ink = _paper_and_ink(rng)
    width, height = _page_size(rng)
    page = Image.new("RGB", (width, height), paper)
    pen = ImageDraw.Draw(page)
    thickness = max(1, int(min(width, height) * rng.uniform(0.02, 0.08)))
    filled = shape != "line" and rng.random() < 0.4
    box = _random_box(rng, width, height)
    if shape == "circle":
        pen.ellipse(box, fill=ink if filled else None, outline=ink, width=thickness)
    elif shape == "rectangle":
        pen.rectangle(box, fill=ink if filled else None, outline=ink, width=thickness)
    elif shape == "line":
        pen.line([tuple(rng.uniform(0.05, 0.95, 2) * (width, height)) for _ in range(2)], ink, thickness)
    else:
        corners = [tuple(rng.uniform(0.05, 0.95, 2) * (width, height)) for _ in range(3)]
        pen.polygon(corners, fill=ink if filled else None, outline=ink, width=thickness)
    return _as_saved(page, rng), f"{shape}{' filled' if filled else ''}, width {thickness}"


def letter(rng: Rng, char: str, fonts: Sequence[str]) -> tuple[Image.Image, str]:
    """One letter in a random font of `fonts`, size, place and slight rotation."""
    paper, ink = _paper_and_ink(rng)
    width, height = _page_size(rng, 64, 200)
    font_path = fonts[int(rng.integers(len(fonts)))]
    font = _font(font_path, int(min(width, height) * rng.uniform(0.4, 0.8)))
    glyph = Image.new("L", (width, height), 0)
    ImageDraw.Draw(glyph).text((width / 2, height / 2), char, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    page = Image.composite(
        Image.new("RGB", (width, height), ink), Image.new("RGB", (width, height), paper), glyph
    )
    return _as_saved(page, rng), f"letter {char}, {font_name(font_path)}"


def _preprocessed(page: Image.Image) -> torch.Tensor | None:
    """The page as the model sees it (uint8 [28, 28]), or None where preprocessing finds no ink."""
    try:
        return to_mnist_pixels(to_grayscale(page))
    except UserError:
        return None


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, for preprocessing one small image at a time: there torch's threads cost more
    than they give (8x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _collect(
    draws: Sequence[tuple[str, Callable[[], tuple[Image.Image, str]]]], fonts: list[str]
) -> ImageSet:
    with one_thread():
        return _draw_all(draws, fonts)


def _draw_all(
    draws: Sequence[tuple[str, Callable[[], tuple[Image.Image, str]]]], fonts: list[str]
) -> ImageSet:
    pixels: list[torch.Tensor] = []
    kinds: list[str] = []
    descriptions: list[str] = []
    refused: dict[str, int] = {}
    for kind, draw in draws:
        page, description = draw()
        seen = _preprocessed(page)
        if seen is None:
            refused[kind] = refused.get(kind, 0) + 1
            continue
        pixels.append(seen)
        kinds.append(kind)
        descriptions.append(description)
    stacked = torch.stack(pixels) if pixels else torch.zeros(0, 28, 28, dtype=torch.uint8)
    return ImageSet(stacked, kinds, descriptions, refused, fonts)


def font_name(path: str) -> str:
    """How a font is named in descriptions: its file name without the extension."""
    return Path(path).stem if path != DEFAULT_FONT else path


def not_digit_set(
    seed: int = 0, per_kind: int = 400, letter_repeats: int = 8, fonts: Sequence[str] | None = None
) -> ImageSet:
    """`per_kind` images of noise (uniform, Gaussian), scribbles and shapes (the shapes in turn), and
    every letter A-Z, a-z `letter_repeats` times in random fonts of `fonts` (default: all of the
    machine's), drawn from `seed`."""
    rng = np.random.default_rng(seed)
    fonts = list(fonts or font_files() or [DEFAULT_FONT])
    draws: list[tuple[str, Callable[[], tuple[Image.Image, str]]]] = []
    draws += [("uniform_noise", lambda: uniform_noise(rng))] * per_kind
    draws += [("gaussian_noise", lambda: gaussian_noise(rng))] * per_kind
    draws += [("scribbles", lambda: scribbles(rng))] * per_kind
    draws += [("shapes", lambda s=s: shapes(rng, s)) for s in islice(cycle(SHAPES), per_kind)]
    draws += [("letters", lambda c=c: letter(rng, c, fonts)) for c in LETTERS for _ in range(letter_repeats)]
    return _collect(draws, fonts)


def photo_of_digit(pixels: np.ndarray, form: str, rng: Rng) -> Image.Image:
    """An MNIST digit (uint8 [28, 28], light on black) as a user's photo or scan of it (see the module)."""
    scale = int(rng.integers(3, 8))
    ink = Image.fromarray(pixels).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    width, height = 28 * scale + int(rng.integers(10, 120)), 28 * scale + int(rng.integers(10, 120))
    place = (int(rng.integers(0, width - 28 * scale)), int(rng.integers(0, height - 28 * scale)))
    if form == "paper":  # dark ink on white paper, PNG
        page = Image.new("L", (width, height), 255)
        page.paste(ImageOps.invert(ink), place)
        return page
    if form == "scan":  # gray paper, weaker contrast, JPEG
        paper = int(rng.integers(190, 240))
        darkness = rng.uniform(0.5, 0.9)
        page = Image.new("L", (width, height), paper)
        strokes = (paper - np.asarray(ink, np.float32) / 255 * darkness * paper).astype(np.uint8)
        page.paste(Image.fromarray(strokes), place)
        return _as_saved(page, rng, jpeg_share=1.0)
    if form == "photo":  # coloured ink on cream paper, sensor noise, a slight tilt and blur, JPEG
        paper = np.array([rng.uniform(215, 250), rng.uniform(205, 245), rng.uniform(185, 235)])
        pen = np.array([rng.uniform(0, 90), rng.uniform(0, 90), rng.uniform(60, 160)])
        mask = np.zeros((height, width), np.float32)
        mask[place[1] : place[1] + 28 * scale, place[0] : place[0] + 28 * scale] = np.asarray(ink) / 255
        page = paper * (1 - mask[..., None]) + pen * mask[..., None]
        page += rng.normal(0, rng.uniform(2, 8), page.shape)
        image = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))
        tilt = float(rng.uniform(-10, 10))
        image = image.rotate(tilt, Image.Resampling.BILINEAR, fillcolor=tuple(int(v) for v in paper))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
        return _as_saved(image, rng, jpeg_share=1.0)
    raise ValueError(f"unknown form {form!r}: one of {', '.join(DIGIT_PHOTO_FORMS)}")


def digit_photo_set(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> ImageSet:
    """Each MNIST digit in `images` ([N, 28, 28] uint8) as a photo or scan, the forms in turn, from `seed`."""
    rng = np.random.default_rng(seed)
    draws = []
    for i, (pixels, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True)):
        form = DIGIT_PHOTO_FORMS[i % len(DIGIT_PHOTO_FORMS)]
        draws.append((form, lambda p=pixels, f=form, d=label: (photo_of_digit(p, f, rng), f"digit {d}")))
    return _collect(draws, [])


def subset(images: ImageSet, keep: Sequence[bool]) -> ImageSet:
    """The images of `images` where `keep` is true (the refusal counts and fonts kept as they are)."""
    index = [i for i, kept in enumerate(keep) if kept]
    return ImageSet(
        images.pixels[index],
        [images.kinds[i] for i in index],
        [images.descriptions[i] for i in index],
        dict(images.refused_by_preprocessing),
        list(images.fonts),
    )


def typed_digit(rng: Rng, digit: int, fonts: Sequence[str]) -> tuple[Image.Image, str]:
    """A digit typed in a random font of `fonts`, as `letter` draws a letter."""
    page, description = letter(rng, str(digit), fonts)
    return page, description.replace("letter", "digit", 1)


def rendered_digit(pixels: np.ndarray, rendering: str, rng: Rng) -> Image.Image:
    """An MNIST digit (uint8 [28, 28], light on black) drawn as `rendering` (not "typed"), dark on light."""
    ink = Image.fromarray(pixels)
    if rendering == "low_resolution":  # a thumbnail or a coarse scan: detail lost, then enlarged again
        side = int(rng.integers(8, 15))
        ink = ink.resize((side, side), Image.Resampling.BOX)
        ink = ink.resize((28 * 3, 28 * 3), Image.Resampling.BILINEAR)
    elif rendering in ("thick", "thin"):  # another pen: strokes grown or shrunk at 3x
        ink = ink.resize((28 * 3, 28 * 3), Image.Resampling.BILINEAR)
        size = int(rng.choice([5, 7])) if rendering == "thick" else 3
        ink = ink.filter(ImageFilter.MaxFilter(size) if rendering == "thick" else ImageFilter.MinFilter(size))
    elif rendering == "small_off_centre":  # a small digit somewhere on a large page
        side = int(rng.integers(200, 400))
        page = Image.new("L", (side, side), 255)
        place = (int(rng.integers(0, side - 28)), int(rng.integers(0, side - 28)))
        page.paste(ImageOps.invert(ink), place)
        return page
    else:
        raise ValueError(f"unknown rendering {rendering!r}: one of {', '.join(DIGIT_RENDERINGS)}")
    width, height = ink.width + int(rng.integers(10, 80)), ink.height + int(rng.integers(10, 80))
    page = Image.new("L", (width, height), 255)
    page.paste(
        ImageOps.invert(ink),
        (int(rng.integers(0, width - ink.width)), int(rng.integers(0, height - ink.height))),
    )
    return _as_saved(page, rng)


def digit_rendering_set(
    images: torch.Tensor, labels: torch.Tensor, fonts: Sequence[str], seed: int = 0
) -> tuple[ImageSet, torch.Tensor]:
    """Digits drawn unlike MNIST's, each rendering of `DIGIT_RENDERINGS` in turn: MNIST digits `images`
    ([N, 28, 28] uint8) with their `labels` re-drawn, and digits typed in `fonts` (the labels of the
    typed ones are their digits, 0..9 in turn); from `seed`. Returns the set and its labels."""
    rng = np.random.default_rng(seed)
    draws = []
    for i, (pixels, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True)):
        rendering = DIGIT_RENDERINGS[i % len(DIGIT_RENDERINGS)]
        if rendering == "typed":
            draws.append((rendering, lambda d=i % 10: typed_digit(rng, d, fonts)))
        else:
            draws.append(
                (rendering, lambda p=pixels, r=rendering, d=label: (rendered_digit(p, r, rng), f"digit {d}"))
            )
    rendered = _collect(draws, list(fonts))
    digits = torch.tensor([int(d.split(",")[0].removeprefix("digit ")) for d in rendered.descriptions])
    return rendered, digits
