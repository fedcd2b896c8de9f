"""Reading users' images with a trained model, behind scripts/predict.py.

Images are files, folders (the image files in them, by name; other files are skipped with a note) or
lists of both; the number is one for all or one per image. Each image gives one line: text for people,
or one JSON object for scripts. An image that cannot be read gives an error line in its place and the
others still get theirs; the exit status then says that something failed.
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from mnist_adder.data.batches import NUM_DIGITS
from mnist_adder.data.preprocess import is_image_name, preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint

FORMATS = ("text", "json")
USAGE = "python scripts/predict.py ckpt_path=<file.ckpt> image=<file or folder> number=<0..9>"


@dataclass
class Prediction:
    image: str
    number: int
    digit: int
    digit_prob: float
    sum: int
    sum_prob: float

    def as_text(self) -> str:
        return (
            f"{self.image}: number {self.number} -> digit {self.digit} ({100 * self.digit_prob:.1f} %), "
            f"sum {self.sum} ({100 * self.sum_prob:.1f} %)"
        )


@dataclass
class Failure:
    image: str
    error: str


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


def image_paths(images: Any) -> list[str]:
    """The image files named: files as given, folders expanded to their image files (by extension, not
    hidden ones), by name. Other files in a folder are skipped with one note per folder on stderr."""
    entries = [str(entry) for entry in _as_list(images) if entry is not None and str(entry) != ""]
    if not entries:
        raise UserError(f"no image given: {USAGE}")
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


def best_prediction(
    image: str, number: int, digit_probs: torch.Tensor, sum_probs: torch.Tensor
) -> Prediction:
    """The most probable digit and sum of one image, from its rows of `class_probabilities`."""
    digit_prob, digit = digit_probs.max(dim=-1)
    sum_prob, total = sum_probs.max(dim=-1)
    return Prediction(
        image, number, int(digit), round(float(digit_prob), 6), int(total), round(float(sum_prob), 6)
    )


def predict_images(
    module: torch.nn.Module, paths: Sequence[str], numbers: Sequence[int], batch_size: int = 256
) -> list[Prediction | Failure]:
    """Predict every readable image; unreadable ones become Failures in their place."""
    inputs: dict[int, torch.Tensor] = {}
    results: list[Prediction | Failure | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            inputs[i] = preprocess_image(path)
        except UserError as err:
            results[i] = Failure(path, str(err))
    order = list(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        digit_probs, sum_probs = class_probabilities(
            module, torch.stack([inputs[i] for i in chunk]), [numbers[i] for i in chunk]
        )
        for k, i in enumerate(chunk):
            results[i] = best_prediction(paths[i], numbers[i], digit_probs[k], sum_probs[k])
    return [r for r in results if r is not None]


def predict(cfg: DictConfig) -> list[Prediction | Failure]:
    """Print one line per image (text or JSON); raise UserError at the end if any image failed."""
    output_format = cfg.get("format", "text")
    if output_format not in FORMATS:
        raise UserError(f"format={output_format!r} is not one of {', '.join(FORMATS)}.")
    if not cfg.get("ckpt_path"):
        raise UserError(f"no checkpoint given: {USAGE}. {HOW_TO_GET_ONE}")
    paths = image_paths(cfg.get("image"))
    numbers = numbers_for(cfg.get("number"), len(paths))
    module, _ = load_checkpoint(cfg.ckpt_path)

    results = predict_images(module, paths, numbers)
    if output_format == "text" and len(results) == 1 and isinstance(results[0], Failure):
        # One image named alone: its error is the one line, not also a count of failures.
        raise UserError(f"{results[0].image}: {results[0].error}")
    for result in results:
        if output_format == "json":
            print(json.dumps(asdict(result)), flush=True)
        elif isinstance(result, Prediction):
            print(result.as_text(), flush=True)
        else:
            print(f"error: {result.image}: {result.error}", file=sys.stderr, flush=True)
    failed = [r for r in results if isinstance(r, Failure)]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} images could not be read (see above).")
    return results
