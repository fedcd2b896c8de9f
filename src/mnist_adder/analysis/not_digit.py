"""Fitting the "not a digit" detector of a trained net, and measuring it against the baselines.

The detector (`mnist_adder.models.not_digit`) is fitted after training, beside the temperatures:

- the classifier (one hidden layer): real digits, the backbone features of the training split (as
  tensors) and of photos of training digits (`digit_photo_set`), against synthetic not-digits
  (`not_digit_set` drawn from `FIT_SEED`, letters in every other font of the machine), the two sides
  weighted equally, trained from `FIT_SEED` on the frozen backbone;
- the threshold: the score that accepts a stated share (default 99 %) of the validation digits, read as
  users' images are read: each as a 28x28 file through `predict`'s preprocessing, and photos of them.

The measurement (`measure`, behind `scripts/eval.py not_digits=true`) scores a not-digit set drawn from
another seed (default 0), MNIST test digits as 28x28 files, photos of MNIST test digits and the
`examples/digits` files with the detector and three baselines, each thresholded at the same share of the
same validation digits: the maximum softmax probability (Hendrycks & Gimpel 2017), the energy score
(Liu et al. 2020) and the Mahalanobis distance to the nearest class on the features of the last layer
(Lee et al. 2018, class means and shared covariance from the training split).
"""

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_adder.data.corruptions import to_pixels
from mnist_adder.data.mnist import normalize
from mnist_adder.data.not_digits import (
    DEFAULT_FONT,
    DIGIT_PHOTO_FORMS,
    NOT_DIGIT_KINDS,
    ImageSet,
    digit_photo_set,
    font_files,
    font_name,
    not_digit_set,
    one_thread,
)
from mnist_adder.data.preprocess import preprocess_image, to_mnist_pixels
from mnist_adder.errors import UserError
from mnist_adder.models.not_digit import NUM_DIGIT_CLASSES, detector_features

log = logging.getLogger(__name__)

# The seed of the synthetic not-digits (and photos) the detector is fitted on; measurements draw their
# not-digits from other seeds (0 by default), so no image measured was seen in fitting.
FIT_SEED = 1
# Share of the validation digits the threshold accepts (the true-positive rate of "is a digit").
DEFAULT_ACCEPT = 0.99
# How many synthetic not-digits the detector is fitted on: per kind of noise, scribbles and shapes, and
# times each letter (about 10,000 in all; half as many refused about 1 point fewer, measured on 3 runs).
FIT_PER_KIND = 2000
FIT_LETTER_REPEATS = 40
# How many training digits are also fitted as photos, and validation digits thresholded as photos.
FIT_PHOTOS = 3000
THRESHOLD_PHOTOS = 1500
# The classifier: hidden units, and its training (AdamW on the weighted cross-entropy, the learning rate
# annealed to 0 on a cosine). Measured on three default runs: 30 epochs refused about 1.5 points more
# not-digits than 10, and the annealing made two fits from different seeds agree more closely.
HIDDEN_UNITS = 64
FIT_EPOCHS = 30
FIT_BATCH = 512
FIT_LR = 3e-3
FIT_WEIGHT_DECAY = 1e-4
# Ridge on the Mahalanobis baseline's covariance, as a share of its mean variance: some features (a
# channel that is nearly constant) have almost no variance, and their inverse would be noise.
RIDGE = 1e-3
BATCH = 1000
METHOD_NAMES = {
    "max_softmax": "max softmax (Hendrycks & Gimpel 2017)",
    "energy": "energy (Liu et al. 2020)",
    "mahalanobis": "Mahalanobis, last layer (Lee et al. 2018)",
    "not_digit": "not_digit: the detector (this project)",
}


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images [N, 1, 28, 28] back to the uint8 pixels [N, 28, 28] they were made from."""
    return (to_pixels(images.float().cpu()) * 255).round().to(torch.uint8).squeeze(1)


def as_files(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [N, 28, 28] as `predict` reads them from 28x28 files: through its preprocessing."""
    with one_thread():
        return torch.stack([to_mnist_pixels(p.numpy()) for p in pixels])


def _model_input(pixels: torch.Tensor) -> torch.Tensor:
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
        number = torch.zeros(len(batch), NUM_DIGIT_CLASSES, device=device)
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


def _gaussians(
    features: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [K, F], precision [F, F]) of K Gaussians with one shared covariance (float64)."""
    means = torch.stack([features[groups == k].mean(dim=0) for k in range(num_groups)])
    residuals = features - means[groups]
    covariance = residuals.T @ residuals / len(features)
    covariance += RIDGE * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)
    return means, torch.linalg.inv(covariance)


def _squared_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[N, K] squared Mahalanobis distances of features [N, F] to means [K, F]."""
    projected = features @ precision
    return (
        (projected * features).sum(dim=1, keepdim=True)
        - 2 * projected @ means.T
        + ((means @ precision) * means).sum(dim=1)[None]
    )


def _fit_classifier(digits: torch.Tensor, not_digits: torch.Tensor) -> dict[str, torch.Tensor]:
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
        torch.manual_seed(FIT_SEED)
        hidden, output = nn.Linear(inputs.shape[1], HIDDEN_UNITS), nn.Linear(HIDDEN_UNITS, 1)
        classifier = nn.Sequential(hidden, nn.ReLU(), output)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
        steps = FIT_EPOCHS * -(-len(inputs) // FIT_BATCH)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in range(FIT_EPOCHS):
            for batch in torch.randperm(len(inputs)).split(FIT_BATCH):
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


def _quantile(scores: torch.Tensor, accept: float) -> float:
    return float(torch.quantile(scores.double(), accept))


def threshold_digits(val_images: torch.Tensor, val_labels: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The validation digits the thresholds are set on (uint8 [N, 28, 28], as `predict` sees users'
    images): each as a 28x28 file, and the first `THRESHOLD_PHOTOS` also as photos; and their description."""
    pixels = as_pixels(val_images)
    photos = digit_photo_set(pixels[:THRESHOLD_PHOTOS], val_labels[:THRESHOLD_PHOTOS].cpu(), seed=FIT_SEED)
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
def _fitting_not_digits(per_kind: int, letter_repeats: int, fonts: tuple[str, ...]) -> ImageSet:
    """The synthetic not-digits of every fit, drawn once per process (8 s on 2 cores): the jobs of a
    sweep in one process, and the tests, share them. The same arguments draw the same set anyway."""
    return not_digit_set(seed=FIT_SEED, per_kind=per_kind, letter_repeats=letter_repeats, fonts=list(fonts))


def fit_not_digit_detector(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    accept: float = DEFAULT_ACCEPT,
) -> dict[str, Any]:
    """Fit `net.not_digit` (see the module) on the training split and set its threshold on the validation
    split; `train` and `val` are (normalised images [N, 1, 28, 28], labels [N]). Returns what was fitted."""
    if not 0 < accept < 1:
        raise ValueError(f"accept must be a share between 0 and 1, not {accept}")
    if not hasattr(net.backbone, "features_and_logits"):
        raise UserError(
            f"the backbone {type(net.backbone).__name__} has no features_and_logits(image), which "
            '"not a digit" reads: define it as ConvBackbone and SeedBackbone do.'
        )
    train_images, train_labels = train
    photos = digit_photo_set(
        as_pixels(train_images[:FIT_PHOTOS]), train_labels[:FIT_PHOTOS].cpu(), seed=FIT_SEED
    )
    fonts = tuple(fitting_fonts(font_files() or [DEFAULT_FONT]))
    not_digits = _fitting_not_digits(FIT_PER_KIND, FIT_LETTER_REPEATS, fonts)
    digit_features = torch.cat(
        [net_outputs(net, images)["features"] for images in (train_images, _model_input(photos.pixels))]
    )
    not_digit_features = net_outputs(net, _model_input(not_digits.pixels))["features"]
    net.not_digit.set(_fit_classifier(digit_features, not_digit_features), threshold=0.0)

    digits, described = threshold_digits(*val)
    scores = net_outputs(net, _model_input(digits))["not_digit"]
    net.not_digit.set_threshold(_quantile(scores, accept))
    threshold = float(net.not_digit.threshold)
    return {
        "method": (
            f"a classifier of {HIDDEN_UNITS} hidden units on the backbone's features: digits against "
            "synthetic not-digits"
        ),
        "features": int(digit_features.shape[1]),
        "fitted_on": (
            f"{len(train_images)} training digits as tensors, {len(photos)} of them as photos, and "
            f"{len(not_digits)} synthetic not-digits (seed {FIT_SEED})"
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


def auroc(outliers: torch.Tensor, inliers: torch.Tensor) -> float:
    """Area under the ROC curve of telling outliers (higher scores) from inliers: the chance that a
    random outlier scores above a random inlier, ties counting half (Mann-Whitney U)."""
    scores = torch.cat([outliers, inliers]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # The average rank (1-based) of each distinct value, for ties.
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    n_out, n_in = len(outliers), len(inliers)
    return float((ranks[:n_out].sum() - n_out * (n_out + 1) / 2) / (n_out * n_in))


def _share(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if len(mask) else float("nan")


def _by(labels: Sequence[str], refused: torch.Tensor) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for label, value in zip(labels, refused.tolist(), strict=True):
        groups.setdefault(label, []).append(bool(value))
    return {label: float(np.mean(values)) for label, values in sorted(groups.items())}


def _where(labels: Sequence[str], mask: torch.Tensor) -> list[str]:
    return [label for label, keep in zip(labels, mask.tolist(), strict=True) if keep]


def _baseline_scores(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The three baselines' score functions of `net_outputs`; Mahalanobis fitted on the training split."""
    train_images, train_labels = train
    last_layer = net_outputs(net, train_images)["last_layer"]
    means, precision = _gaussians(last_layer, train_labels.cpu(), NUM_DIGIT_CLASSES)
    return {
        "max_softmax": lambda out: 1 - out["probs"].max(dim=1).values,
        "energy": lambda out: -torch.logsumexp(out["logits"], dim=1),
        "mahalanobis": lambda out: _squared_distances(out["last_layer"], means, precision).min(dim=1).values,
    }


def measure(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    examples: Sequence[Path],
    threshold: float | None = None,
    seed: int = 0,
    accept: float = DEFAULT_ACCEPT,
    photos: int = 3000,
) -> dict[str, Any]:
    """The detector of `net` (fitted) and the baselines on the measurement sets (see the module).

    `threshold`: the detector's (None: the stored one); the baselines' are set on the validation digits at
    `accept`. Returns the report written to not_digits.json."""
    if seed == FIT_SEED:
        log.warning("not_digits_seed=%d is the seed the detector was fitted on: choose another.", seed)
    test_images, test_labels = test
    not_digits = not_digit_set(seed=seed)
    test_pixels = as_pixels(test_images)
    digit_photos = digit_photo_set(test_pixels[:photos], test_labels[:photos].cpu(), seed=seed)
    threshold_pixels, described = threshold_digits(*val)
    sets = {
        "not_digits": _model_input(not_digits.pixels),
        "mnist_test_files": _model_input(as_files(test_pixels)),
        "mnist_test_tensors": test_images,
        "photos": _model_input(digit_photos.pixels),
        "examples": torch.stack([preprocess_image(path) for path in examples]),
        "validation": _model_input(threshold_pixels),
    }
    outputs = {name: net_outputs(net, images) for name, images in sets.items()}
    score_fns = _baseline_scores(net, train)
    score_fns["not_digit"] = lambda out: out["not_digit"]
    stored = float(net.not_digit.threshold)
    letters = [d.split(",")[0].removeprefix("letter ") for d in not_digits.descriptions]
    fitted_fonts = {font_name(f) for f in fitting_fonts(not_digits.fonts)}
    unseen_font = torch.tensor(
        [
            k == "letters" and d.split(", ", 1)[1] not in fitted_fonts
            for k, d in zip(not_digits.kinds, not_digits.descriptions, strict=True)
        ]
    )
    shapes = [d.split(",")[0] for d in not_digits.descriptions]
    results: dict[str, Any] = {}
    for method, score_fn in score_fns.items():
        scores = {name: score_fn(out) for name, out in outputs.items()}
        if method == "not_digit":
            cut = stored if threshold is None else threshold
        else:
            cut = _quantile(scores["validation"], accept)
        refused = scores["not_digits"] > cut
        kinds = np.array(not_digits.kinds)
        letter_mask = torch.from_numpy(kinds == "letters")
        shape_mask = torch.from_numpy(kinds == "shapes")
        results[method] = {
            "auroc_mnist_test": auroc(scores["not_digits"], scores["mnist_test_files"]),
            "auroc_photos": auroc(scores["not_digits"], scores["photos"]),
            "threshold": cut,
            "not_digits_refused": _share(refused),
            "refused_by_kind": _by(not_digits.kinds, refused),
            "mnist_test_accepted": _share(scores["mnist_test_files"] <= cut),
            "mnist_test_tensors_accepted": _share(scores["mnist_test_tensors"] <= cut),
            "photos_accepted": _share(scores["photos"] <= cut),
            "photos_accepted_by_form": _by(digit_photos.kinds, scores["photos"] <= cut),
            "validation_accepted": _share(scores["validation"] <= cut),
            "examples_accepted": {
                path.name: bool(s <= cut) for path, s in zip(examples, scores["examples"], strict=True)
            },
            "letters_refused": _by(_where(letters, letter_mask), refused[letter_mask]),
            "letters_refused_unseen_fonts": _share(refused[unseen_font]),
            "shapes_refused": _by(_where(shapes, shape_mask), refused[shape_mask]),
        }
    return {
        "seed": seed,
        "accept": accept,
        "thresholds_set_on": described,
        "not_digits": {kind: not_digits.kinds.count(kind) for kind in NOT_DIGIT_KINDS},
        "not_digits_refused_by_preprocessing": not_digits.refused_by_preprocessing,
        "fonts": [font_name(f) for f in not_digits.fonts],
        "fonts_fitted": sorted(fitted_fonts),
        "letters_in_unseen_fonts": int(unseen_font.sum()),
        "mnist_test_digits": len(test_labels),
        "photos": {form: digit_photos.kinds.count(form) for form in DIGIT_PHOTO_FORMS},
        "examples": [str(p) for p in examples],
        "methods": results,
    }


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def format_not_digits(report: dict[str, Any], worst: int = 12) -> str:
    """The tables for people: per method its AUROCs and what it refuses and accepts at its threshold;
    per kind of not-digit the share each method refuses; the letters and shapes the detector lets pass
    most often."""
    methods = report["methods"]
    columns = ("AUROC test", "AUROC photos", "threshold", "refused", "test acc.", "photos acc.", "examples")
    header = f"{'method':<44}" + "".join(f"{c:>13}" for c in columns)
    lines = [header, "-" * len(header)]
    for method, result in methods.items():
        examples = result["examples_accepted"]
        cells = (
            f"{result['auroc_mnist_test']:.4f}",
            f"{result['auroc_photos']:.4f}",
            f"{result['threshold']:.4g}",
            _percent(result["not_digits_refused"]),
            _percent(result["mnist_test_accepted"]),
            _percent(result["photos_accepted"]),
            f"{sum(examples.values())}/{len(examples)}",
        )
        lines.append(f"{METHOD_NAMES[method]:<44}" + "".join(f"{c:>13}" for c in cells))
    lines += [
        "(AUROC of not-digits against MNIST test digits as 28x28 files and against photos of them; "
        "refused: share of not-digits; acc.: share of digits accepted)",
        "",
        f"{'refused, by kind':<20}{'images':>8}" + "".join(f"{m:>14}" for m in methods),
    ]
    for kind, count in report["not_digits"].items():
        shares = "".join(
            f"{_percent(r['refused_by_kind'].get(kind, float('nan'))):>14}" for r in methods.values()
        )
        lines.append(f"{kind:<20}{count:>8}{shares}")
    # Letters in the fonts the detector never saw: how far its letters carry beyond the fonts it knows.
    shares = "".join(f"{_percent(r['letters_refused_unseen_fonts']):>14}" for r in methods.values())
    lines.append(f"{'letters, new fonts':<20}{report['letters_in_unseen_fonts']:>8}{shares}")
    detector = methods["not_digit"]
    for what in ("letters", "shapes"):
        passed = sorted(detector[f"{what}_refused"].items(), key=lambda item: item[1])[:worst]
        listed = ", ".join(f"{name} {_percent(1 - share)}" for name, share in passed)
        lines.append(f"{what} the detector accepts most often (share accepted): {listed}")
    lines.append(
        f"thresholds: the baselines' accept {_percent(report['accept'])} of the "
        f"{report['thresholds_set_on']}; the detector's is {detector['threshold']:.4g} "
        f"(accepting {_percent(detector['validation_accepted'])} of them)"
    )
    return "\n".join(lines)
