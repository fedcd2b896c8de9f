"""Random affine augmentation of a whole batch at once: one affine_grid and one grid_sample."""

import math

import torch
import torch.nn.functional as F

from mnist_adder.data.mnist import MNIST_MEAN, MNIST_STD

# The value of a black pixel after normalisation: what the border is filled with.
BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD


class RandomAffine:
    """Rotate by up to `degrees`, scale by up to +-`scale`, shift by up to `translate` of the side.

    Each image gets its own transform, drawn from `generator` so a batch can be reproduced.
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: float = 0.1) -> None:
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, device = images.shape[0], images.device
        u = torch.rand(n, 4, generator=generator, device=device) * 2 - 1  # uniform in [-1, 1)
        angle = u[:, 0] * math.radians(self.degrees)
        zoom = 1 + u[:, 1] * self.scale
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of t sides is 2t there.
        shift = u[:, 2:] * 2 * self.translate
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)],
            dim=1,
        ).to(images.dtype)
        return warp(images, theta, BACKGROUND)


def warp(images: torch.Tensor, theta: torch.Tensor, background: float = 0.0) -> torch.Tensor:
    """Each image [N, C, H, W] resampled through its affine map `theta` [N, 2, 3] (output to input
    coordinates in [-1, 1], as `F.affine_grid`), bilinear; what comes from outside is `background`."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - background, grid, align_corners=False) + background
