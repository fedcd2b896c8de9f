"""Pictures for TensorBoard, drawn with PIL (no plotting library): confusion matrices and image grids.

Every function returns an RGB uint8 array [H, W, 3], what `SummaryWriter.add_image(..., dataformats="HWC")`
takes.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mnist_adder.data.mnist import MNIST_MEAN, MNIST_STD

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)
BLUE, RED = (8, 48, 107), (180, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _blend(color: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """White blended towards `color` by `amount` in 0..1."""
    amount = min(max(amount, 0.0), 1.0)
    return tuple(round(255 + (c - 255) * amount) for c in color)  # type: ignore[return-value]


def _centered_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font, fill) -> None:
    x0, y0, x1, y1 = box
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=fill, font=font, anchor="mm")


def confusion_matrix_image(matrix: torch.Tensor, title: str) -> np.ndarray:
    """A confusion matrix (rows: true class, columns: predicted) with counts and each row's accuracy.

    The diagonal is shaded blue by the row's accuracy; errors red by their share of the row (magnified
    ten times, so that a single confusion is still visible next to a 98 % diagonal). The column on the
    right is each class's accuracy.
    """
    counts = matrix.detach().cpu().long()
    num_classes = counts.shape[0]
    cell = 34 if num_classes <= 10 else 28
    font, small = _font(cell // 3 + 2), _font(cell // 3)
    left, top, right, bottom = 2 * cell, 3 * cell, 2 * cell, cell
    width, height = left + num_classes * cell + right, top + num_classes * cell + bottom
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=BLACK, font=font)
    _centered_text(draw, (left, cell, left + num_classes * cell, 2 * cell), "predicted", small, GREY)
    _centered_text(draw, (0, top - cell, left, top), "true", small, GREY)
    _centered_text(draw, (left + num_classes * cell, top - cell, width, top), "acc %", small, GREY)
    row_totals = counts.sum(dim=1)
    for i in range(num_classes):
        y = top + i * cell
        _centered_text(draw, (left - cell, y, left, y + cell), str(i), font, BLACK)
        _centered_text(draw, (left + i * cell, top - cell, left + (i + 1) * cell, top), str(i), font, BLACK)
        total = int(row_totals[i])
        for j in range(num_classes):
            count = int(counts[i, j])
            share = count / total if total else 0.0
            fill = _blend(BLUE, share) if i == j else _blend(RED, 0.12 + 10 * share if count else 0.0)
            x = left + j * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(225, 225, 225))
            if count:
                dark = sum(fill) < 3 * 150
                _centered_text(draw, (x, y, x + cell, y + cell), str(count), small, WHITE if dark else BLACK)
        accuracy = f"{100 * int(counts[i, i]) / total:.1f}" if total else "-"
        x = left + num_classes * cell
        _centered_text(draw, (x, y, x + right, y + cell), accuracy, small, BLACK)
    return np.asarray(image)


def _to_pixels(image: torch.Tensor) -> np.ndarray:
    """A normalised image [1, 28, 28] back to uint8 pixels [28, 28] (the inverse of `normalize`)."""
    pixels = (image.detach().float().cpu()[0] * MNIST_STD + MNIST_MEAN).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).numpy()


def misclassified_grid(
    images: torch.Tensor,
    labels: Sequence[int],
    numbers: Sequence[int],
    digit_preds: Sequence[int],
    sum_preds: Sequence[int],
    columns: int = 8,
    scale: int = 3,
) -> np.ndarray:
    """A grid of normalised images [N, 1, 28, 28], each captioned `label + number = sum` (the truth) and
    `got digit, sum` (the prediction, red where wrong)."""
    side = 28 * scale
    caption, pad = 34, 6
    tile_w, tile_h = side + pad, side + caption + pad
    count = len(images)
    rows = max(1, -(-count // columns))
    grid = Image.new("RGB", (columns * tile_w + pad, rows * tile_h + pad), WHITE)
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    for k in range(count):
        x, y = pad + (k % columns) * tile_w, pad + (k // columns) * tile_h
        tile = Image.fromarray(_to_pixels(images[k])).resize((side, side), Image.Resampling.NEAREST)
        grid.paste(tile.convert("RGB"), (x, y))
        label, number, digit, total = int(labels[k]), int(numbers[k]), int(digit_preds[k]), int(sum_preds[k])
        draw.text((x, y + side + 2), f"{label} + {number} = {label + number}", fill=BLACK, font=font)
        got = f"got {digit}, "
        draw.text((x, y + side + 17), got, fill=BLACK if digit == label else RED, font=font)
        offset = draw.textlength(got, font=font)
        draw.text(
            (x + offset, y + side + 17), str(total), fill=BLACK if total == label + number else RED, font=font
        )
    return np.asarray(grid)


def reliability_diagram_image(bins: dict[str, Sequence[float]], title: str, size: int = 360) -> np.ndarray:
    """A reliability diagram from `reliability_bins`: per confidence bin a bar of its accuracy (blue),
    the gap to its mean confidence (red: over-confident above the bar, under-confident inside it),
    the diagonal of perfect calibration, and below, the share of samples per bin (log scale: most
    samples of a good model sit in the last bin)."""
    counts, confidences, accuracies = bins["count"], bins["confidence"], bins["accuracy"]
    n_bins, total = len(counts), max(sum(counts), 1)
    font, small = _font(13), _font(11)
    left, top, right, gap, hist = 48, 40, 16, 34, 60
    width, height = left + size + right, top + size + gap + hist + 28
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill=BLACK, font=font)

    def x_at(value: float) -> float:
        return left + value * size

    def y_at(value: float, base: int = top + size, span: int = size) -> float:
        return base - value * span

    bin_width = size / n_bins
    for k in range(n_bins):
        if not counts[k]:
            continue
        x0, x1 = left + k * bin_width, left + (k + 1) * bin_width - 1
        accuracy, confidence = accuracies[k], confidences[k]
        draw.rectangle((x0, y_at(accuracy), x1, y_at(0)), fill=_blend(BLUE, 0.75))
        low, high = sorted((accuracy, confidence))
        draw.rectangle((x0, y_at(high), x1, y_at(low)), fill=_blend(RED, 0.45), outline=RED)
    draw.rectangle((left, top, left + size, top + size), outline=BLACK)
    draw.line((x_at(0), y_at(0), x_at(1), y_at(1)), fill=GREY, width=1)
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.text((left - 6, y_at(tick)), f"{tick:.1f}", fill=BLACK, font=small, anchor="rm")
        draw.text((x_at(tick), top + size + 4), f"{tick:.1f}", fill=BLACK, font=small, anchor="ma")
    draw.text((left + 4, top + 4), "accuracy", fill=GREY, font=small, anchor="la")
    # Sample share per bin on a log scale from 1e-4 to 1.
    base = top + size + gap + hist
    draw.text(
        (left, top + size + 18),
        "confidence (top probability); below: share of samples, log",
        fill=GREY,
        font=small,
    )
    for k in range(n_bins):
        if counts[k]:
            share = counts[k] / total
            level = min(max((np.log10(share) + 4) / 4, 0.02), 1.0)
            x0 = left + k * bin_width
            draw.rectangle((x0, base - level * hist, x0 + bin_width - 1, base), fill=GREY)
    draw.line((left, base, left + size, base), fill=BLACK)
    return np.asarray(image)
