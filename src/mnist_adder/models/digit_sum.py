"""The two-input, two-output network: a backbone reads the digit, an adder adds the number."""

from typing import Literal

import torch
from torch import nn

AdderInput = Literal["logits", "softmax", "detached"]


class DigitSumNet(nn.Module):
    """(image [B,1,28,28], number_onehot [B,10]) -> (digit_logits [B,10], sum_logits [B,19]).

    The adder sees `cat([digit_output, number_onehot])`, where digit_output is the backbone's raw
    logits (as the seed did), their softmax (a scale the adder can rely on), or the softmax with the
    gradient stopped (the sum loss then cannot pull on the backbone).
    """

    def __init__(self, backbone: nn.Module, adder: nn.Module, adder_input: AdderInput = "logits") -> None:
        super().__init__()
        if adder_input not in ("logits", "softmax", "detached"):
            raise ValueError(f"adder_input must be logits, softmax or detached, not {adder_input!r}")
        self.backbone, self.adder, self.adder_input = backbone, adder, adder_input

    def forward(self, image: torch.Tensor, number_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digit_logits = self.backbone(image)
        digit_output = digit_logits
        if self.adder_input == "softmax":
            digit_output = digit_logits.softmax(dim=-1)
        elif self.adder_input == "detached":
            digit_output = digit_logits.detach().softmax(dim=-1)
        sum_logits = self.adder(torch.cat([digit_output, number_onehot], dim=-1))
        return digit_logits, sum_logits
