"""Our own parts: a conv backbone that leaves full resolution at once, and an MLP adder.

On a CPU the cost of an MNIST convnet is the convolutions at high resolution, so the only layer that
sees all 28x28 pixels has a single input channel and stride 2; the rest runs at 12x12 and below.
"""

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class ConvBackbone(nn.Module):
    """Image [B, 1, 28, 28] -> digit logits [B, 10].

    28 -(5x5, stride 2)-> 12 -(3x3)-> 10 -(max pool)-> 5 -(3x3)-> 3 -> flatten -> linear.
    The last feature map keeps its 3x3 layout (no global pooling): where a stroke is matters.
    """

    def __init__(
        self, channels: Sequence[int] = (16, 32, 40), dropout: float = 0.1, stem_channels: int = 0
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        # stem_channels > 0: one thin 3x3 layer at full resolution first (28 -> 26), then a strided 3x3
        # to 12x12: finer strokes survive the first downsampling, for few channels at 26x26.
        first = (
            [conv_bn_relu(1, stem_channels, 3), conv_bn_relu(stem_channels, c1, 3, stride=2)]
            if stem_channels
            else [conv_bn_relu(1, c1, 5, stride=2)]
        )
        self.features = nn.Sequential(
            *first,
            conv_bn_relu(c1, c2, 3),
            nn.MaxPool2d(2),
            conv_bn_relu(c2, c3, 3),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c3 * 3 * 3, 10))

    def features_and_logits(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features, digit logits [B, 10]), for "not a digit" (`mnist_adder.models.not_digit`): the output
        of each conv block but the last [B, C, H, W], then the input of the last linear layer [B, c3 * 9]
        (the last block's 3x3 map, flattened; dropout is the identity in eval mode)."""
        maps = []
        features = image
        for layer in self.features:
            features = layer(features)
            if isinstance(layer, nn.Sequential):  # a conv block; the max pooling is none
                maps.append(features)
        *to_linear, linear = self.head
        for layer in to_linear:
            features = layer(features)
        return [*maps[:-1], features], linear(features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class MLPAdder(nn.Module):
    """[B, 20] (digit output ++ number one-hot) -> sum logits [B, 19].

    One hidden ReLU layer is enough to add: a unit can read the sum d + n as a weighted sum of the
    inputs, and ReLUs of that scalar around each k build a peak at class k.
    """

    def __init__(self, hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
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
