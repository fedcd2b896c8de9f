"""Reading users' images with a trained model, behind scripts/predict.py.

With an MNIST-addition checkpoint, `first=` and `second=` name two numbers' digit images instead
(`inference/number_prediction.py`).

Images are files, folders (the image files in them, by name; other files are skipped with a note) or
lists of both; the number is one for all or one per image. Each image gives one line: text for people,
or one JSON object for scripts. An image that cannot be read gives an error line in its place and the
others still get theirs; the exit status then says that something failed. An image that does not look
like a handwritten digit (its not-a-digit score is above the threshold, see
`mnist_adder.models.not_digit`) gets no digit and no sum but a line that says so: a result, not an error.
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.config_checks import check_config, check_reject_threshold, reject_threshold_off
from mnist_adder.data.preprocess import is_image_name, preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint
from mnist_adder.inference.number_prediction import USAGE as ADDITION_USAGE
from mnist_adder.inference.number_prediction import AdditionPrediction, add_numbers

FORMATS = ("text", "json")
USAGE = "python scripts/predict.py ckpt_path=<file.ckpt> image=<file or folder> number=<0..9>"


NOT_A_DIGIT = "does not look like a handwritten digit to this model; no digit or sum given"


@dataclass
class Prediction:
    image: str
    number: int
    digit: int
    digit_prob: float
    sum: int
    sum_prob: float
    # The not-a-digit score and the threshold it passed (None: the checkpoint has no detector, or it is off).
    not_digit_score: float | None = None
    reject_threshold: float | None = None

    def as_text(self) -> str:
        return (
            f"{self.image}: number {self.number} -> digit {self.digit} ({100 * self.digit_prob:.1f} %), "
            f"sum {self.sum} ({100 * self.sum_prob:.1f} %)"
        )


@dataclass(kw_only=True)
class NotDigit:
    """An image refused as not a digit: no digit, no sum, its score and the threshold it exceeded."""

    image: str
    number: int
    digit: None = None
    digit_prob: None = None
    sum: None = None
    sum_prob: None = None
    not_digit_score: float
    reject_threshold: float
    reason: str = ""

    def __post_init__(self) -> None:
        self.reason = self.reason or (
            f"not a digit (score {self.not_digit_score:.2f} > threshold {self.reject_threshold:.2f}): "
            f"{NOT_A_DIGIT}"
        )

    def as_text(self) -> str:
        return f"{self.image}: {self.reason}"


@dataclass
class Failure:
    image: str
    error: str


def reject_threshold(value: Any, module: torch.nn.Module) -> float | None:
    """The threshold above which an image is refused as not a digit, from `reject_threshold=`: null the
    checkpoint's (None where it has no detector), a number that one, off or false none (None)."""
    net = getattr(module, "net", module)
    fitted = net.not_digit.fitted
    check_reject_threshold(value)
    if value is None:
        return float(net.not_digit.threshold) if fitted else None
    if reject_threshold_off(value):
        return None
    if not fitted:
        raise UserError(
            f"reject_threshold={value!r}: this checkpoint has no not-a-digit detector to threshold. Fit "
            "one with python scripts/calibrate.py ckpt_path=<file.ckpt> (it writes <file>.calibrated.ckpt), "
            "or leave reject_threshold=null."
        )
    return float(value)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, ListConfig | list | tuple) else [value]


def _skipped_note(folder: str, skipped: list[Path]) -> str:
    names = ", ".join(p.name for p in skipped[:5]) + (
        f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    )
    return (
        f"note: {folder}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
        f"{'are' if len(skipped) > 1 else 'is'} not an image by extension: {names}"
    )


def image_paths(images: Any, key: str = "image", usage: str = USAGE) -> list[str]:
    """The image files named (by `key`): files as given, folders expanded to their image files (by
    extension, not hidden ones), by name. Other files in a folder are skipped with one note per folder
    on stderr."""
    entries = [str(entry) for entry in _as_list(images) if entry is not None and str(entry) != ""]
    if not entries:
        raise UserError(f"no image given for {key}: {usage}")
    paths: list[str] = []
    for entry in entries:
        folder = Path(entry)
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            images_in = [p for p in files if is_image_name(p)]
            skipped = [p for p in files if not is_image_name(p)]
            if not images_in:
                held = f" (it holds {len(files)} other file{'s' if len(files) > 1 else ''})" if files else ""
                raise UserError(
                    f"folder {entry} holds no image files{held}: put the images to read in it "
                    "(PNG, JPEG or another format PIL reads, by extension)."
                )
            if skipped:
                print(_skipped_note(entry, skipped), file=sys.stderr, flush=True)
            paths += [str(p) for p in images_in]
        else:
            paths.append(entry)  # a missing file is reported in its place, with the others' results
    return paths


def numbers_for(number: Any, count: int) -> list[int]:
    """One number 0..9 per image, from one number for all or a list of one per image."""
    if number is None:
        raise UserError(f"no number given: {USAGE} (or number=[n1,n2,...], one per image)")
    numbers = _as_list(number)
    for n in numbers:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < NUM_DIGITS:
            raise UserError(f"number={n!r} is not a whole number from 0 to 9: the model adds numbers 0..9.")
    if len(numbers) == 1:
        return numbers * count
    if len(numbers) != count:
        raise UserError(
            f"{len(numbers)} numbers for {count} images: give one number for all, or one per image "
            f"(folders count each of their files, in name order)."
        )
    return numbers


@torch.inference_mode()
def class_probabilities(
    module: torch.nn.Module, images: torch.Tensor, numbers: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit probabilities [N, 10], sum probabilities [N, 19]) of preprocessed images [N, 1, 28, 28],
    each with its number 0..9. Every tool that shows probabilities (predict, the demo) takes them here."""
    number_onehot = torch.eye(NUM_DIGITS)[list(numbers)]
    digit_logits, sum_logits = module(images, number_onehot)
    return digit_logits.softmax(dim=-1), sum_logits.softmax(dim=-1)


@torch.inference_mode()
def not_digit_scores(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The not-a-digit scores [N] of preprocessed images [N, 1, 28, 28] (NaN without a detector)."""
    return getattr(module, "net", module).not_digit_score(images)


def best_prediction(
    image: str,
    number: int,
    digit_probs: torch.Tensor,
    sum_probs: torch.Tensor,
    score: float | None = None,
    threshold: float | None = None,
) -> Prediction | NotDigit:
    """The most probable digit and sum of one image, from its rows of `class_probabilities`; or, when its
    not-a-digit `score` is above `threshold` (None: no threshold), the refusal."""
    shown_score = shown_threshold = None
    if threshold is not None and score is not None:
        shown_score, shown_threshold = round(float(score), 4), round(float(threshold), 4)
        if score > threshold:
            return NotDigit(
                image=image, number=number, not_digit_score=shown_score, reject_threshold=shown_threshold
            )
    digit_prob, digit = digit_probs.max(dim=-1)
    sum_prob, total = sum_probs.max(dim=-1)
    return Prediction(
        image,
        number,
        int(digit),
        round(float(digit_prob), 6),
        int(total),
        round(float(sum_prob), 6),
        shown_score,
        shown_threshold,
    )


def predict_images(
    module: torch.nn.Module,
    paths: Sequence[str],
    numbers: Sequence[int],
    batch_size: int = 256,
    threshold: Any = None,
) -> list[Prediction | NotDigit | Failure]:
    """Predict every readable image; unreadable ones become Failures in their place, and images that do
    not look like a digit NotDigit. `threshold` as `reject_threshold=` (None: the checkpoint's)."""
    cutoff = reject_threshold(threshold, module)
    inputs: dict[int, torch.Tensor] = {}
    results: list[Prediction | NotDigit | Failure | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            inputs[i] = preprocess_image(path)
        except UserError as err:
            results[i] = Failure(path, str(err))
    order = list(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = torch.stack([inputs[i] for i in chunk])
        digit_probs, sum_probs = class_probabilities(module, images, [numbers[i] for i in chunk])
        scores = not_digit_scores(module, images).tolist()
        for k, i in enumerate(chunk):
            results[i] = best_prediction(
                paths[i], numbers[i], digit_probs[k], sum_probs[k], scores[k], cutoff
            )
    return [r for r in results if r is not None]


def _predict_addition(cfg: DictConfig, output_format: str) -> AdditionPrediction:
    """`first=... second=...`: add two numbers written as images with an MNIST-addition checkpoint."""
    if cfg.get("image") is not None or cfg.get("number") is not None:
        raise UserError(
            "image=/number= and first=/second= were both given: image= and number= ask a checkpoint of "
            "the (image, number) task, first= and second= one of MNIST addition; give one pair."
        )
    threshold = cfg.get("reject_threshold")
    if threshold is not None and not reject_threshold_off(threshold):
        raise UserError(
            f"reject_threshold={threshold!r}: an MNIST-addition checkpoint has no not-a-digit detector; "
            "leave reject_threshold=null."
        )
    first = image_paths(cfg.get("first"), "first", ADDITION_USAGE)
    second = image_paths(cfg.get("second"), "second", ADDITION_USAGE)
    module, _ = load_checkpoint(
        cfg.ckpt_path,
        tasks=("mnist_addition",),
        used_by="scripts/predict.py first=... second=...",
        hint="ask it with image=<file or folder> number=<0..9>",
    )
    result = add_numbers(module.net, first, second)
    print(json.dumps(asdict(result)) if output_format == "json" else result.as_text(), flush=True)
    return result


def predict(cfg: DictConfig) -> list[Prediction | NotDigit | Failure] | AdditionPrediction:
    """Print one line per image (text or JSON); raise UserError at the end if any image failed. With
    `first=` and `second=` (an MNIST-addition checkpoint): the two numbers read and their sum."""
    output_format = cfg.get("format", "text")
    if output_format not in FORMATS:
        raise UserError(f"format={output_format!r} is not one of {', '.join(FORMATS)}.")
    check_config(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError(f"no checkpoint given: {USAGE}. {HOW_TO_GET_ONE}")
    if cfg.get("first") is not None or cfg.get("second") is not None:
        return _predict_addition(cfg, output_format)
    paths = image_paths(cfg.get("image"))
    numbers = numbers_for(cfg.get("number"), len(paths))
    module, _ = load_checkpoint(
        cfg.ckpt_path,
        tasks=("digit_sum",),
        used_by="scripts/predict.py image=... number=...",
        hint="it adds two numbers written as images: give first=<images or folder> second=<images or "
        "folder>, most significant digit first",
    )
    results = predict_images(module, paths, numbers, threshold=cfg.get("reject_threshold"))
    if output_format == "text" and len(results) == 1 and isinstance(results[0], Failure):
        # One image named alone: its error is the one line, not also a count of failures.
        raise UserError(f"{results[0].image}: {results[0].error}")
    for result in results:
        if output_format == "json":
            print(json.dumps(asdict(result)), flush=True)
        elif isinstance(result, Prediction | NotDigit):
            print(result.as_text(), flush=True)
        else:
            print(f"error: {result.image}: {result.error}", file=sys.stderr, flush=True)
    failed = [r for r in results if isinstance(r, Failure)]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} images could not be read (see above).")
    return results
