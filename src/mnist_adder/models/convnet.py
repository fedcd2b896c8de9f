"""Our own parts: a conv backbone that downsamples early, and an MLP adder.

On a CPU most of the cost of an MNIST convnet is in convolutions at full 28x28 resolution, so the
first layer is cheap (1 input channel) and each later stage runs after a 2x2 pool.
"""

from collections.abc import Sequence

import torch
from torch import nn


class ConvBackbone(nn.Module):
    """Image [B, 1, 28, 28] -> digit logits [B, 10].

    One conv-BN-ReLU-pool stage per entry of `channels` (28 -> 14 -> 7 -> 3), then a linear layer
    over the flattened last feature map.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32), dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = 1, 28
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, size = c_out, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * size * size, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class MLPAdder(nn.Module):
    """[B, 20] (digit output ++ number one-hot) -> sum logits [B, 19].

    Adding is bilinear in (digit, number): a ReLU layer of about 100 units can hold one unit per
    (digit, number) pair, so one hidden layer of that width is enough.
    """

    def __init__(self, hidden: Sequence[int] = (128,), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        n_in = 20
        for n_out in hidden:
            layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            n_in = n_out
        self.mlp = nn.Sequential(*layers, nn.Linear(n_in, 19))

    def forward(self, adder_input: torch.Tensor) -> torch.Tensor:
        return self.mlp(adder_input)
