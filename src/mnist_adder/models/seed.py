"""The seed network, exactly as the original assignment built it (../shared/seed/architecture.md).

MNISt: 8 bias-free convs ending in 10 digit logits (7,840 parameters).
MNISTadder: cat([digit_output, number_onehot]) -> 32 -> 64 -> 128 -> 19 sum logits (14,003 parameters).
"""

import torch
from torch import nn


def _conv(c_in: int, c_out: int, kernel: int, dropout: float | None) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, kernel, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return [*layers, nn.Dropout(dropout)] if dropout is not None else layers


class SeedBackbone(nn.Module):
    """The seed's `MNISt`: image [B, 1, 28, 28] -> digit logits [B, 10]."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(1, 10, 3, dropout),  # 26x26
            *_conv(10, 10, 3, dropout),  # 24x24
            *_conv(10, 15, 3, None),  # 22x22
            nn.MaxPool2d(2),  # 11x11
            *_conv(15, 10, 1, dropout),  # 11x11
            *_conv(10, 10, 3, dropout),  # 9x9
            *_conv(10, 10, 3, dropout),  # 7x7
            *_conv(10, 10, 3, dropout),  # 5x5
            nn.Conv2d(10, 10, 5, bias=False),  # 1x1: no BN, no ReLU, these are the logits
        )

    def features_and_logits(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features, digit logits [B, 10]), for "not a digit" (`mnist_adder.models.not_digit`): the output
        of each conv block (its ReLU) but the last [B, C, H, W], then the input of the last conv [B, 250]
        (the last block's 10x5x5 map, flattened)."""
        maps = []
        *to_last, last_conv = self.features
        features = image
        for layer in to_last:
            features = layer(features)
            if isinstance(layer, nn.ReLU):
                maps.append(features)
        return [*maps[:-1], features.flatten(1)], last_conv(features).flatten(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features(image).flatten(1)


class SeedAdder(nn.Module):
    """The seed's `MNISTadder`: [B, 20] (digit output ++ number one-hot) -> sum logits [B, 19]."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out in [(20, 32), (32, 64), (64, 128)]:
            layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers, nn.Linear(128, 19))

    def forward(self, adder_input: torch.Tensor) -> torch.Tensor:
        return self.mlp(adder_input)
