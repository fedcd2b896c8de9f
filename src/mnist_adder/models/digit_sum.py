"""The two-input, two-output network: a backbone reads the digit, an adder adds the number."""

from typing import Any, Literal

import torch
from torch import nn

from mnist_adder.adder_inputs import accepted_adder_inputs
from mnist_adder.classes import NUM_DIGITS
from mnist_adder.models.not_digit import NotDigitDetector, detector_features

AdderInput = Literal["logits", "softmax", "detached"]
# One temperature per head (temperature scaling, Guo et al. 2017), stored as buffers so that they travel
# with the weights: in checkpoints, and as constants in the ONNX and TorchScript exports.
TEMPERATURES = ("digit_temperature", "sum_temperature")
# (rows, columns) of the one-pixel shifts that `test_shifts` averages over, beside the image itself.
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


class DigitSumNet(nn.Module):
    """(image [B,1,28,28], number_onehot [B,10]) -> (digit_logits [B,10], sum_logits [B,19]).

    The adder sees `cat([digit_output, number_onehot])`, where digit_output is the backbone's raw
    logits (as the seed did), their softmax (a scale the adder can rely on), or the softmax with the
    gradient stopped (the sum loss then cannot pull on the backbone). The shift adders (models/adders.py)
    add a distribution, so they take the softmax only (`mnist_adder.adder_inputs`).

    The returned logits are divided by `digit_temperature` and `sum_temperature` (1 unless a checkpoint
    was calibrated, see `mnist_adder.postfit.temperature`). The adder always sees the raw digit output,
    so a temperature changes the probabilities of a head, never its argmax and never the sum.

    `test_shifts`: out of training (eval mode), the digit logits are the mean log-probabilities of the
    image and its copies shifted by one pixel up, down, left and right (test-time augmentation: five
    backbone passes), and the adder reads them. Training (and validation, part of it) is unchanged.

    `not_digit` scores how little an image looks like a digit (`mnist_adder.models.not_digit`; empty, so
    no score, until fitted by `mnist_adder.postfit.not_digit`); `forward_with_not_digit` gives it beside
    the two heads. It reads the backbone's `features_and_logits`, which both backbones define.
    """

    digit_temperature: torch.Tensor
    sum_temperature: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        adder: nn.Module,
        adder_input: AdderInput = "logits",
        test_shifts: bool = False,
    ) -> None:
        super().__init__()
        if adder_input not in ("logits", "softmax", "detached"):
            raise ValueError(f"adder_input must be logits, softmax or detached, not {adder_input!r}")
        accepted = accepted_adder_inputs(type(adder).__name__)
        if adder_input not in accepted:
            raise ValueError(
                f"{type(adder).__name__} adds the digit's probabilities: adder_input must be "
                f"{' or '.join(accepted)}, not {adder_input!r}"
            )
        self.backbone, self.adder, self.adder_input = backbone, adder, adder_input
        self.test_shifts = test_shifts
        # Buffers, not parameters: the optimizer never sees them and parameter counts stay as they were.
        for name in TEMPERATURES:
            self.register_buffer(name, torch.ones(()))
        self.not_digit = NotDigitDetector()

    def set_temperatures(self, digit: float, sum_: float) -> None:
        """Set both heads' temperatures (> 0); 1 and 1 give the raw logits."""
        for name, value in zip(TEMPERATURES, (digit, sum_), strict=True):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
            getattr(self, name).fill_(float(value))

    def temperatures(self) -> tuple[float, float]:
        """(digit temperature, sum temperature)."""
        return float(self.digit_temperature), float(self.sum_temperature)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints written before temperatures existed lack them: they load with temperature 1
        # (their logits as they were), as BatchNorm does for its num_batches_tracked.
        for name in TEMPERATURES:
            state_dict.setdefault(prefix + name, torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def not_digit_features(self, image: torch.Tensor) -> torch.Tensor:
        """The detector's features [B, F] of images [B, 1, 28, 28]."""
        features, _ = self.backbone.features_and_logits(image)
        return detector_features(features)

    def not_digit_score(self, image: torch.Tensor) -> torch.Tensor:
        """The not-a-digit score [B] (float64) of images [B, 1, 28, 28]: higher is less like a digit; NaN
        without a fitted detector."""
        return self.not_digit.score(self.not_digit_features(image))

    def forward_with_not_digit(
        self, image: torch.Tensor, number_onehot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`'s (digit_logits, sum_logits) and `not_digit_score` (the backbone runs twice: forward
        stays the one path of training, and the backbone is small)."""
        digit_logits, sum_logits = self(image, number_onehot)
        return digit_logits, sum_logits, self.not_digit_score(image)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the right shapes (blank images, numbers 0, 1, ...): for tracing and layer tables."""
        return torch.zeros(batch, 1, 28, 28), torch.eye(NUM_DIGITS)[torch.arange(batch) % NUM_DIGITS]

    def shift_averaged_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Digit log-probabilities [B, 10] averaged over the image and its four one-pixel shifts. MNIST
        digits sit in a 20x20 box with a 4-pixel background margin, so a roll wraps background only."""
        # One backbone pass per view: on the CPU one pass over 5B images is slower than five over B
        # (docs/experiment-log.md).
        views = [image, *(torch.roll(image, shifts=shift, dims=(2, 3)) for shift in SHIFTS)]
        return torch.stack([self.backbone(view).log_softmax(dim=-1) for view in views]).mean(dim=0)

    def forward(
        self, image: torch.Tensor, number_onehot: torch.Tensor, shifts: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit_logits, sum_logits); `shifts=False` reads the plain net even where `test_shifts` is on
        (validation does: it is part of training)."""
        if shifts and self.test_shifts and not self.training:
            digit_logits = self.shift_averaged_logits(image)
        else:
            digit_logits = self.backbone(image)
        digit_output = digit_logits
        if self.adder_input == "softmax":
            digit_output = digit_logits.softmax(dim=-1)
        elif self.adder_input == "detached":
            digit_output = digit_logits.detach().softmax(dim=-1)
        sum_logits = self.adder(torch.cat([digit_output, number_onehot], dim=-1))
        # Only the outputs are scaled, after the adder has used the raw digit output. Dividing by 1 is
        # exact in floating point, so an uncalibrated net gives bit-identical logits.
        return digit_logits / self.digit_temperature, sum_logits / self.sum_temperature
