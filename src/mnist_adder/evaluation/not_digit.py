"""Measuring the "not a digit" detector against three baselines, behind `scripts/eval.py not_digits=true`.

A not-digit set drawn from another seed than the fit's (default 0), MNIST test digits as 28x28 files,
photos of MNIST test digits and the `examples/digits` files are scored by the detector and three
baselines, each thresholded at the same share of the same validation digits: the maximum softmax
probability (Hendrycks & Gimpel 2017), the energy score (Liu et al. 2020) and the Mahalanobis distance to
the nearest class on the features of the last layer (Lee et al. 2018, class means and shared covariance
from the training split). The fit itself is `mnist_adder.postfit.not_digit`.

`unseen_families` measures the detector as it will be met: on families it was not fitted to. Each
not-digit family (`NOT_DIGIT_KINDS`) in turn is left out of a refit of the detector and measured alone;
digits drawn unlike MNIST's (`DIGIT_RENDERINGS`: typed in fonts the letters are never fitted in,
low-resolution, thick and thin strokes, small and off centre), none of which any fit sees, are measured
with the checkpoint's own detector: the share accepted, the accuracy among them all and among the
accepted, and how many of the refused the net reads wrong (refusals should fall on those).
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.data.not_digits import (
    DEFAULT_FONT,
    DIGIT_PHOTO_FORMS,
    DIGIT_RENDERINGS,
    NOT_DIGIT_KINDS,
    digit_photo_set,
    digit_rendering_set,
    font_files,
    font_name,
    not_digit_set,
)
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.postfit.not_digit import (
    DEFAULT_ACCEPT,
    DEFAULT_FIT,
    DetectorFit,
    as_files,
    as_pixels,
    fit_not_digit_detector,
    fitting_fonts,
    model_input,
    net_outputs,
    quantile,
    threshold_digits,
)

log = logging.getLogger(__name__)

# Ridge on the Mahalanobis baseline's covariance, as a share of its mean variance: some features (a
# channel that is nearly constant) have almost no variance, and their inverse would be noise.
RIDGE = 1e-3


METHOD_NAMES = {
    "max_softmax": "max softmax (Hendrycks & Gimpel 2017)",
    "energy": "energy (Liu et al. 2020)",
    "mahalanobis": "Mahalanobis, last layer (Lee et al. 2018)",
    "not_digit": "not_digit: the detector (this project)",
}


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
    means, precision = _gaussians(last_layer, train_labels.cpu(), NUM_DIGITS)
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
    fit: DetectorFit = DEFAULT_FIT,
) -> dict[str, Any]:
    """The detector of `net` (fitted) and the baselines on the measurement sets (see the module).

    `threshold`: the detector's (None: the stored one); the baselines' are set on the validation digits at
    `accept`, taken as the detector's fit `fit` takes them. Returns the report written to not_digits.json."""
    if seed == fit.seed:
        log.warning("not_digits_seed=%d is the seed the detector was fitted on: choose another.", seed)
    test_images, test_labels = test
    not_digits = not_digit_set(seed=seed)
    test_pixels = as_pixels(test_images)
    digit_photos = digit_photo_set(test_pixels[:photos], test_labels[:photos].cpu(), seed=seed)
    threshold_pixels, described = threshold_digits(*val, fit)
    sets = {
        "not_digits": model_input(not_digits.pixels),
        "mnist_test_files": model_input(as_files(test_pixels)),
        "mnist_test_tensors": test_images,
        "photos": model_input(digit_photos.pixels),
        "examples": torch.stack([preprocess_image(path) for path in examples]),
        "validation": model_input(threshold_pixels),
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
            cut = quantile(scores["validation"], accept)
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


def _selective(right: torch.Tensor, scores: torch.Tensor, points: int = 21) -> list[dict[str, float]]:
    """Accuracy among the accepted against the share accepted, accepting the lowest scores first."""
    order = scores.argsort()
    correct = right[order].double().cumsum(0)
    rows = []
    for share in torch.linspace(1 / points, 1, points - 1).tolist():
        count = max(1, round(share * len(order)))
        rows.append({"accepted": count / len(order), "accuracy": float(correct[count - 1] / count)})
    return rows


def _digits_report(right: torch.Tensor, scores: torch.Tensor, cut: float) -> dict[str, Any]:
    accepted = scores <= cut
    refused = ~accepted
    return {
        "images": len(right),
        "accepted": _share(accepted),
        "accuracy_all": _share(right),
        "accuracy_accepted": _share(right[accepted]),
        "refused_read_wrong": _share(~right[refused]),
    }


def unseen_families(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    accept: float = DEFAULT_ACCEPT,
    fit: DetectorFit = DEFAULT_FIT,
    seed: int = 0,
    per_kind: int = 400,
    digits: int = 2000,
) -> dict[str, Any]:
    """The detector on families it was not fitted to (see the module): not-digits leave-one-family-out
    (`per_kind` of each, from `seed`; the net's detector is refitted once per family and put back after),
    and `digits` MNIST test digits re-drawn as `DIGIT_RENDERINGS` with the checkpoint's own detector.
    Returns the report written to not_digits_unseen.json."""
    if not net.not_digit.fitted:
        raise ValueError("the net has no fitted detector to measure")
    not_digits = not_digit_set(seed=seed, per_kind=per_kind, letter_repeats=max(1, per_kind // 50))
    kinds = np.array(not_digits.kinds)
    fonts = font_files() or [DEFAULT_FONT]
    unfitted_fonts = [f for f in fonts if f not in set(fitting_fonts(fonts))] or fonts
    test_pixels, test_labels = as_pixels(test[0][:digits]), test[1][:digits].cpu()
    rendered, labels = digit_rendering_set(test_pixels, test_labels, unfitted_fonts, seed=seed)
    outputs = net_outputs(net, model_input(rendered.pixels))
    right = outputs["probs"].argmax(dim=1) == labels
    cut = float(net.not_digit.threshold)
    rendered_kinds = np.array(rendered.kinds)
    renderings = {}
    for rendering in DIGIT_RENDERINGS:
        mask = torch.from_numpy(rendered_kinds == rendering)
        renderings[rendering] = _digits_report(right[mask], outputs["not_digit"][mask], cut)
    mnist = net_outputs(net, model_input(as_files(test_pixels)))
    mnist_right = mnist["probs"].argmax(dim=1) == test_labels

    saved = {name: value.clone() for name, value in net.not_digit.state_dict().items()}
    families = {}
    try:
        for family in NOT_DIGIT_KINDS:
            refit = fit_not_digit_detector(net, train, val, accept, fit, leave_out=(family,))
            scores = net_outputs(net, model_input(not_digits.pixels[torch.from_numpy(kinds == family)]))
            families[family] = {
                "images": int((kinds == family).sum()),
                "refused": _share(scores["not_digit"] > refit["threshold"]),
            }
    finally:
        net.not_digit.load_state_dict(saved)
    return {
        "seed": seed,
        "accept": accept,
        "threshold": cut,
        "not_digits_left_out": families,
        "not_digits_refused_mean": float(np.mean([f["refused"] for f in families.values()])),
        "digit_renderings": renderings,
        "all_renderings": _digits_report(right, outputs["not_digit"], cut),
        "fonts_typed": [font_name(f) for f in unfitted_fonts],
        "mnist_test_files": _digits_report(mnist_right, mnist["not_digit"], cut),
        "selective": {
            "all renderings": _selective(right, outputs["not_digit"]),
            "MNIST test files": _selective(mnist_right, mnist["not_digit"]),
        },
    }


def operating_points(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(share accepted, accuracy among the accepted) at the detector's threshold, for the curves of
    `unseen_families`'s report (`selective`): all renderings together, and the MNIST test files."""
    return {
        name: (report[key]["accepted"], report[key]["accuracy_accepted"])
        for name, key in (("all renderings", "all_renderings"), ("MNIST test files", "mnist_test_files"))
    }


def format_unseen_families(report: dict[str, Any]) -> str:
    """`unseen_families`'s report as two tables for people."""
    lines = [f"{'not-digit family, left out of the fit':<40}{'images':>8}{'refused':>10}", "-" * 58]
    for family, row in report["not_digits_left_out"].items():
        lines.append(f"{family:<40}{row['images']:>8}{_percent(row['refused']):>10}")
    lines.append(f"{'mean over families':<40}{'':>8}{_percent(report['not_digits_refused_mean']):>10}")
    columns = ("images", "accepted", "acc. all", "acc. accepted", "refused: wrong")
    lines += ["", f"{'digits (no fit sees these)':<28}" + "".join(f"{c:>15}" for c in columns), "-" * 103]
    rows = {**report["digit_renderings"], "MNIST test, as 28x28 files": report["mnist_test_files"]}
    for name, row in rows.items():
        cells = (
            str(row["images"]),
            _percent(row["accepted"]),
            _percent(row["accuracy_all"]),
            _percent(row["accuracy_accepted"]),
            _percent(row["refused_read_wrong"]),
        )
        lines.append(f"{name:<28}" + "".join(f"{c:>15}" for c in cells))
    lines.append(
        f"(the checkpoint's threshold {report['threshold']:.4g}; typed digits in fonts never fitted)"
    )
    return "\n".join(lines)


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
