"""Pictures for TensorBoard and the results page: charts drawn with matplotlib, image grids with PIL.

The charts (`confusion_matrix_figure`, `reliability_diagram_figure`, `draw_reliability`) are matplotlib
`Figure`s, built without pyplot (no global figure state, no display: rendered by the Agg canvas), for
`SummaryWriter.add_figure` and `Figure.savefig`. The grid of misclassified digits stays a PIL picture:
it is pixels, not a chart, and returns an RGB uint8 array [H, W, 3] for `add_image(..., dataformats="HWC")`.
"""

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from mnist_adder.data.mnist import unnormalize

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
RED = (180, 20, 20)
# White to blue for the diagonal (right), white to red for the errors (wrong).
RIGHT_COLORS = LinearSegmentedColormap.from_list("right", ["#ffffff", "#08306b"])
WRONG_COLORS = LinearSegmentedColormap.from_list("wrong", ["#ffffff", "#b41414"])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def confusion_matrix_figure(matrix: torch.Tensor, title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted) with counts and each row's accuracy.

    The diagonal is shaded blue by the row's accuracy; errors red by their share of the row (magnified
    ten times, so that a single confusion is still visible next to a 98 % diagonal). The column on the
    right is each class's accuracy in percent.
    """
    counts = matrix.detach().cpu().long().numpy()
    num_classes = counts.shape[0]
    totals = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(totals, 1)
    diagonal = np.eye(num_classes, dtype=bool)
    colors = np.where(
        diagonal[..., None],
        RIGHT_COLORS(share),
        WRONG_COLORS(np.where(counts > 0, np.clip(0.12 + 10 * share, 0, 1), 0.0)),
    )
    # Fixed margins in inches rather than a layout engine: measuring every text for the layout doubled
    # the time to draw, and this runs after every validation epoch.
    cell, left, right, top, bottom = 0.34, 0.6, 0.6, 0.9, 0.15
    width, height = left + num_classes * cell + right, top + num_classes * cell + bottom
    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.add_axes(
        (left / width, bottom / height, num_classes * cell / width, num_classes * cell / height)
    )
    axes.imshow(colors, interpolation="nearest")
    font = 8 if num_classes <= 10 else 6
    for i, j in zip(*np.nonzero(counts), strict=True):
        dark = diagonal[i, j] and share[i, j] > 0.5
        axes.text(
            j,
            i,
            str(counts[i, j]),
            ha="center",
            va="center",
            fontsize=font,
            color="white" if dark else "black",
        )
    for i in range(num_classes):
        accuracy = f"{100 * share[i, i]:.1f}" if totals[i, 0] else "-"
        axes.text(num_classes - 0.2, i, accuracy, ha="left", va="center", fontsize=font)
    axes.text(num_classes - 0.2, -0.9, "acc %", ha="left", va="center", fontsize=font, color="grey")
    axes.set_xticks(range(num_classes), labels=[str(c) for c in range(num_classes)], fontsize=font)
    axes.set_yticks(range(num_classes), labels=[str(c) for c in range(num_classes)], fontsize=font)
    axes.xaxis.set_ticks_position("top")
    axes.xaxis.set_label_position("top")
    axes.set_xlabel("predicted", fontsize=font + 1)
    axes.set_ylabel("true", fontsize=font + 1)
    figure.text(0.1 / width, 1 - 0.1 / height, title, fontsize=font + 1, va="top")
    return figure


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
        tile = Image.fromarray(unnormalize(images[k])[0].numpy()).resize(
            (side, side), Image.Resampling.NEAREST
        )
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


def draw_reliability(axes: Axes, histogram: Axes, bins: dict[str, Sequence[float]], title: str) -> None:
    """A reliability diagram from `reliability_bins` on two axes: on `axes` per confidence bin a bar of
    its accuracy (blue), the gap to its mean confidence (red: over-confident above the bar,
    under-confident inside it) and the diagonal of perfect calibration; on `histogram` the share of
    samples per bin (log scale: most samples of a good model sit in the last bin)."""
    counts = np.asarray(bins["count"], dtype=float)
    confidence, accuracy = np.asarray(bins["confidence"]), np.asarray(bins["accuracy"])
    n_bins, total = len(counts), max(counts.sum(), 1.0)
    left = np.arange(n_bins) / n_bins
    filled = counts > 0
    width = 1 / n_bins
    axes.bar(
        left[filled],
        accuracy[filled],
        width,
        align="edge",
        color="#8fa9cc",
        edgecolor="white",
        label="accuracy",
    )
    low, high = np.minimum(accuracy, confidence), np.maximum(accuracy, confidence)
    axes.bar(
        left[filled],
        (high - low)[filled],
        width,
        bottom=low[filled],
        align="edge",
        color="#e3a3a3",
        edgecolor="#b41414",
        label="gap to confidence",
    )
    axes.plot([0, 1], [0, 1], color="grey", linewidth=1, label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    axes.set_title(title, fontsize=9, loc="left")
    axes.legend(loc="upper left", fontsize=7, frameon=False)
    histogram.bar(left[filled], counts[filled] / total, width, align="edge", color="grey")
    histogram.set(
        xlim=(0, 1), yscale="log", ylim=(1e-4, 1), xlabel="confidence (top probability)", ylabel="share"
    )


def reliability_diagram_figure(bins: dict[str, Sequence[float]], title: str) -> Figure:
    """`draw_reliability` as a figure of its own (eval's `reliability_<head>.png` and TensorBoard)."""
    figure = Figure(figsize=(4.2, 5.0), dpi=100, layout="constrained")
    axes, histogram = figure.subplots(2, 1, sharex=True, height_ratios=(4, 1))
    draw_reliability(axes, histogram, bins, title)
    return figure


def selective_prediction_figure(
    curves: dict[str, Sequence[dict[str, float]]], operating: dict[str, tuple[float, float]], title: str
) -> Figure:
    """Accuracy among the accepted digits against the share accepted, one line per set of digits
    (`curves`: points {"accepted", "accuracy"}, accepting the lowest not-a-digit scores first), and the
    detector's threshold on each (`operating`: (share accepted, accuracy accepted)). A good detector's
    lines rise to the left: what it refuses first are the digits the net reads wrong."""
    figure = Figure(figsize=(5.0, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots()
    for (name, points), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        axes.plot([p["accepted"] for p in points], [p["accuracy"] for p in points], color=color, label=name)
        if name in operating:
            axes.plot(*operating[name], "o", color=color)
    axes.set_xlabel("share of digits accepted (lowest not-a-digit scores first)")
    axes.set_ylabel("accuracy among the accepted")
    axes.set_xlim(0, 1.02)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, title="dots: the detector's threshold", title_fontsize=8)
    return figure
