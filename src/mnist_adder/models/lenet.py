"""The MNIST-addition papers' network (DeepProbLog 2018 and the works that compare with it), for a
comparison on the same net: conv 1->6 5x5, max pool, ReLU, conv 6->16 5x5, max pool, ReLU, then
256->120->84->10 with ReLUs (44,426 parameters)."""

import torch
from torch import nn


class LeNet(nn.Module):
    """Image [B, 1, 28, 28] -> digit logits [B, 10]: 28 -(5x5)-> 24 -(pool)-> 12 -(5x5)-> 8 -(pool)-> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU()),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU()
        )
        self.classifier = nn.Linear(84, 10)

    def features_and_logits(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features, digit logits [B, 10]) as the other backbones give them to "not a digit"
        (`mnist_adder.models.not_digit`): the first conv block's map [B, 6, 12, 12], then the input of
        the last linear layer [B, 84]."""
        first = self.features[0](image)
        hidden = self.head(self.features[1](first))
        return [first, hidden], self.classifier(hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(image)))
