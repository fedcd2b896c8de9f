"""Fitting the "not a digit" detector (`mnist_adder.models.not_digit`) of a trained net.

- the classifier (one hidden layer): real digits, the backbone features of the training split (as
  tensors) and of photos of training digits (`digit_photo_set`), against synthetic not-digits
  (`not_digit_set`, letters in every other font of the machine), the two sides weighted equally,
  trained on the frozen backbone;
- the threshold: the score that accepts a stated share (default 99 %) of the validation digits, read as
  users' images are read: each as a 28x28 file through `predict`'s preprocessing, and photos of them.

How many images and how the classifier trains: `DetectorFit`, the config group `detector`. Its
measurement against baselines is `mnist_adder.evaluation.not_digit`.
"""

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.data.mnist import normalize, unnormalize
from mnist_adder.data.not_digits import (
    DEFAULT_FONT,
    DIGIT_PHOTO_FORMS,
    ImageSet,
    digit_photo_set,
    font_files,
    font_name,
    not_digit_set,
    one_thread,
    subset,
)
from mnist_adder.data.preprocess import to_mnist_pixels
from mnist_adder.errors import UserError
from mnist_adder.models.not_digit import detector_features

log = logging.getLogger(__name__)

# Share of the validation digits the threshold accepts (the true-positive rate of "is a digit").
DEFAULT_ACCEPT = 0.99
BATCH = 1000


@dataclass(frozen=True)
class DetectorFit:
    """How the detector is fitted: the config group `detector` (conf/detector/default.yaml holds these
    defaults; the choices they were measured against are in docs/experiment-log.md).

    `seed`: of the synthetic not-digits and photos fitted on, and of the classifier's training
    (measurements draw theirs from other seeds, so no image measured was seen in fitting).
    `per_kind`, `letter_repeats`: synthetic not-digits per kind of noise, scribbles and shapes, and
    times each letter. `photos`: training digits also fitted as photos; `threshold_photos`: validation
    digits also thresholded as photos. `hidden_units`, `epochs`, `batch`, `lr`, `weight_decay`: the
    classifier and its training (AdamW on the weighted cross-entropy, the learning rate annealed to 0
    on a cosine).
    """

    seed: int = 1
    per_kind: int = 2000
    letter_repeats: int = 40
    photos: int = 3000
    threshold_photos: int = 1500
    hidden_units: int = 64
    epochs: int = 30
    batch: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        counts = (
            "per_kind",
            "letter_repeats",
            "photos",
            "threshold_photos",
            "hidden_units",
            "epochs",
            "batch",
        )
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a whole number of at least 0, not {self.seed!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, not {self.lr!r} and {self.weight_decay!r}"
            )


DEFAULT_FIT = DetectorFit()


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images [N, 1, 28, 28] back to the uint8 pixels [N, 28, 28] they were made from."""
    return unnormalize(images).squeeze(1)


def as_files(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [N, 28, 28] as `predict` reads them from 28x28 files: through its preprocessing."""
    with one_thread():
        return torch.stack([to_mnist_pixels(p.numpy()) for p in pixels])


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    return normalize(pixels).unsqueeze(1)


@torch.no_grad()
def net_outputs(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detector's features [N, F] and score [N] (NaN before it is fitted), the last layer's input
    [N, D], the raw digit logits [N, 10] and the net's digit probabilities [N, 10] (what `predict` shows)
    of normalised images [N, 1, 28, 28], on the CPU in float64."""
    # In eval mode, whatever mode the net was given in: in training mode BatchNorm would take these images
    # into its running statistics, changing the weights that are handed over (and dropout would be on).
    was_training = net.training
    net.eval()
    try:
        return _net_outputs(net, images)
    finally:
        net.train(was_training)


def _net_outputs(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    device = next(net.parameters()).device
    names = ("features", "not_digit", "last_layer", "logits", "probs")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH].to(device).float()
        # One backbone pass for the detector and the baselines; the net's forward for what predict shows.
        raw_features, logits = net.backbone.features_and_logits(batch)
        features = detector_features(raw_features)
        number = torch.zeros(len(batch), NUM_DIGITS, device=device)
        number[:, 0] = 1
        digit_logits, _ = net(batch, number)
        for name, value in (
            ("features", features),
            ("not_digit", net.not_digit.score(features)),
            ("last_layer", raw_features[-1].flatten(1)),
            ("logits", logits),
            ("probs", digit_logits.float().softmax(dim=-1)),
        ):
            parts[name].append(value.double().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def _fit_classifier(
    digits: torch.Tensor, not_digits: torch.Tensor, fit: DetectorFit
) -> dict[str, torch.Tensor]:
    """The layers of `NotDigitDetector` trained to tell `not_digits` [M, F] (target 1) from `digits` [N, F]
    (target 0), features standardised by the digits' mean and scale; the same from the same features."""
    mean = digits.mean(dim=0)
    spread = digits.std(dim=0)
    # A feature (a channel that is nearly constant) can have almost no spread; dividing by it would be noise.
    scale = spread + 1e-3 * spread.mean()
    inputs = ((torch.cat([digits, not_digits]) - mean) / scale).float()
    targets = torch.cat([torch.zeros(len(digits)), torch.ones(len(not_digits))])
    # The two sides count equally, however many of each there are.
    weights = torch.where(targets == 1, len(digits) / len(not_digits), 1.0)
    with torch.random.fork_rng(devices=[]):  # its own seed, the caller's random state left as it was
        torch.manual_seed(fit.seed)
        hidden, output = nn.Linear(inputs.shape[1], fit.hidden_units), nn.Linear(fit.hidden_units, 1)
        classifier = nn.Sequential(hidden, nn.ReLU(), output)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
        steps = fit.epochs * -(-len(inputs) // fit.batch)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in range(fit.epochs):
            for batch in torch.randperm(len(inputs)).split(fit.batch):
                logits = classifier(inputs[batch]).squeeze(1)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, targets[batch], weights[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return {
        "mean": mean,
        "scale": scale,
        "hidden_weight": hidden.weight.detach(),
        "hidden_bias": hidden.bias.detach(),
        "output_weight": output.weight.detach().squeeze(0),
        "output_bias": output.bias.detach().squeeze(0),
    }


def quantile(scores: torch.Tensor, accept: float) -> float:
    return float(torch.quantile(scores.double(), accept))


def threshold_digits(
    val_images: torch.Tensor, val_labels: torch.Tensor, fit: DetectorFit = DEFAULT_FIT
) -> tuple[torch.Tensor, str]:
    """The validation digits the thresholds are set on (uint8 [N, 28, 28], as `predict` sees users'
    images): each as a 28x28 file, and the first `fit.threshold_photos` also as photos; and their
    description."""
    pixels = as_pixels(val_images)
    count = fit.threshold_photos
    photos = digit_photo_set(pixels[:count], val_labels[:count].cpu(), seed=fit.seed)
    described = (
        f"{len(pixels)} validation digits as 28x28 files and {len(photos)} of them as photos "
        f"({', '.join(DIGIT_PHOTO_FORMS)})"
    )
    return torch.cat([as_files(pixels), photos.pixels]), described


def fitting_fonts(fonts: Sequence[str]) -> list[str]:
    """The fonts the detector's letters are drawn in: every other one of the machine's, so that the
    measurement can tell letters in fonts never fitted (`letters_refused_unseen_fonts`)."""
    return list(fonts[::2])


@functools.lru_cache(maxsize=1)
def _fitting_not_digits(seed: int, per_kind: int, letter_repeats: int, fonts: tuple[str, ...]) -> ImageSet:
    """The synthetic not-digits of every fit, drawn once per process (seconds): the jobs of a sweep in
    one process, and the tests, share them. The same arguments draw the same set anyway."""
    return not_digit_set(seed=seed, per_kind=per_kind, letter_repeats=letter_repeats, fonts=list(fonts))


def fit_not_digit_detector(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    accept: float = DEFAULT_ACCEPT,
    fit: DetectorFit = DEFAULT_FIT,
    leave_out: Sequence[str] = (),
) -> dict[str, Any]:
    """Fit `net.not_digit` (see the module) on the training split and set its threshold on the validation
    split; `train` and `val` are (normalised images [N, 1, 28, 28], labels [N]), `fit` how (the config
    group `detector`); `leave_out`: not-digit kinds (`NOT_DIGIT_KINDS`) kept out of the fit, to measure
    the detector on a family it never saw. Returns what was fitted."""
    if not 0 < accept < 1:
        raise ValueError(f"accept must be a share between 0 and 1, not {accept}")
    if not hasattr(net.backbone, "features_and_logits"):
        raise UserError(
            f"the backbone {type(net.backbone).__name__} has no features_and_logits(image), which "
            '"not a digit" reads: define it as ConvBackbone and SeedBackbone do.'
        )
    train_images, train_labels = train
    photos = digit_photo_set(
        as_pixels(train_images[: fit.photos]), train_labels[: fit.photos].cpu(), seed=fit.seed
    )
    fonts = tuple(fitting_fonts(font_files() or [DEFAULT_FONT]))
    not_digits = _fitting_not_digits(fit.seed, fit.per_kind, fit.letter_repeats, fonts)
    if leave_out:
        not_digits = subset(not_digits, [kind not in leave_out for kind in not_digits.kinds])
    digit_features = torch.cat(
        [net_outputs(net, images)["features"] for images in (train_images, model_input(photos.pixels))]
    )
    not_digit_features = net_outputs(net, model_input(not_digits.pixels))["features"]
    net.not_digit.set(_fit_classifier(digit_features, not_digit_features, fit), threshold=0.0)

    digits, described = threshold_digits(*val, fit)
    scores = net_outputs(net, model_input(digits))["not_digit"]
    net.not_digit.set_threshold(quantile(scores, accept))
    threshold = float(net.not_digit.threshold)
    return {
        "method": (
            f"a classifier of {fit.hidden_units} hidden units on the backbone's features: digits against "
            "synthetic not-digits"
        ),
        "features": int(digit_features.shape[1]),
        "fitted_on": (
            f"{len(train_images)} training digits as tensors, {len(photos)} of them as photos, and "
            f"{len(not_digits)} synthetic not-digits (seed {fit.seed})"
        ),
        "threshold": threshold,
        "accept": accept,
        "threshold_set_on": described,
        "validation_accepted": float((scores <= threshold).double().mean()),
        "fonts": [font_name(f) for f in not_digits.fonts],
    }


def format_not_digit(fitted: dict[str, Any]) -> str:
    """One line on a fitted detector (`fit_not_digit_detector`'s record), for the logs of training and
    scripts/calibrate.py."""
    return (
        f"Not a digit: threshold {fitted['threshold']:.4f} accepts "
        f"{100 * fitted['validation_accepted']:.1f} % of the {fitted['threshold_set_on']}; "
        f"fitted on {fitted['fitted_on']}."
    )
