"""Adding two numbers written as images with an MNIST-addition checkpoint, behind scripts/predict.py
`first=... second=...`.

Each number is a list of image files or a folder of them (by name), most significant digit first, one
digit an image, preprocessed as every image the project reads (`data.preprocess`). The backbone reads
each digit; the sum's distribution is the exact one of training (`models.number_sum`): the answer is
both the field's prediction (the sum of the most probable digits) and the most probable sum with its
probability (`map_sum`, exact). Numbers of different lengths are added as written: the shorter one gets
leading zeros that are certain, not read from an image.
"""

from dataclasses import dataclass
from typing import Any

import torch

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.models.adders import LOG_ZERO
from mnist_adder.models.number_sum import argmax_digit_sum, map_sum

USAGE = (
    "python scripts/predict.py ckpt_path=<file.ckpt> first=<images or folder> second=<images or folder> "
    "(each number's digits as images, most significant first)"
)


@dataclass
class DigitRead:
    image: str
    digit: int
    digit_prob: float


@dataclass
class AdditionPrediction:
    """Two numbers read from their images and their sum, as text or one JSON object."""

    first: list[DigitRead]
    second: list[DigitRead]
    first_number: str  # the most probable digits, as written
    second_number: str
    digits_sum: str  # the field's prediction: the sum of the most probable digits
    most_probable_sum: str  # under the exact distribution of the sum
    most_probable_sum_prob: float

    def as_text(self) -> str:
        def number_line(name: str, number: str, digits: list[DigitRead]) -> str:
            read = ", ".join(f"{d.image} {d.digit} ({100 * d.digit_prob:.1f} %)" for d in digits)
            return f"{name}: {number}  [{read}]"

        return "\n".join(
            [
                number_line("first", self.first_number, self.first),
                number_line("second", self.second_number, self.second),
                f"sum of the digits read: {self.digits_sum}",
                f"most probable sum: {self.most_probable_sum} ({100 * self.most_probable_sum_prob:.1f} %)",
            ]
        )


def _as_number(digits: list[int]) -> str:
    """Digits, most significant first, as the number is written (no leading zeros; 0 stays 0)."""
    return "".join(str(d) for d in digits).lstrip("0") or "0"


def _read_images(paths: list[str]) -> torch.Tensor:
    images = []
    for path in paths:
        try:
            images.append(preprocess_image(path))
        except UserError as err:  # one unreadable digit leaves no number to add: the whole answer fails
            raise UserError(f"{path}: {err}") from None
    return torch.stack(images)


def _certain_zeros(count: int) -> torch.Tensor:
    """Digit logits [count, 10] of leading zeros: probability 1 on 0."""
    logits = torch.full((count, NUM_DIGITS), LOG_ZERO)
    logits[:, 0] = 0.0
    return logits


@torch.inference_mode()
def add_numbers(net: Any, first: list[str], second: list[str]) -> AdditionPrediction:
    """Read both numbers' digit images (paths, most significant first) with `net` (a NumberSumNet) and
    add them: the digits read with their probabilities, the sum of the most probable digits and the
    most probable sum with its probability."""
    logits = net.backbone(_read_images(first + second)).float()
    first_logits, second_logits = logits[: len(first)], logits[len(first) :]
    width = max(len(first), len(second))
    padded = [torch.cat([_certain_zeros(width - len(part)), part]) for part in (first_logits, second_logits)]
    digit_logits = torch.cat(padded)[None]  # [1, 2N, 10], as a training example
    most_probable, prob, _ = map_sum(net.pair_sum_log_probs(digit_logits)[0].double().exp().numpy())

    def read(paths: list[str], part: torch.Tensor) -> list[DigitRead]:
        probs, digits = part.softmax(dim=-1).max(dim=-1)
        return [
            DigitRead(p, int(d), round(float(q), 6)) for p, d, q in zip(paths, digits, probs, strict=True)
        ]

    first_read, second_read = read(first, first_logits), read(second, second_logits)
    return AdditionPrediction(
        first=first_read,
        second=second_read,
        first_number=_as_number([d.digit for d in first_read]),
        second_number=_as_number([d.digit for d in second_read]),
        digits_sum=_as_number(argmax_digit_sum(digit_logits)[0].tolist()),
        most_probable_sum=_as_number(most_probable),
        most_probable_sum_prob=round(prob, 6),
    )
