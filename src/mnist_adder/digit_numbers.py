"""Numbers written as rows of decimal digits (most significant first), as MNIST addition holds them:
at N = 100 a sum has 101 digits, far beyond int64. Below both the data (the labels) and the models
(their prediction), which may not import each other."""

import torch


def add_digits(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The digits [B, N + 1] of the sum of two numbers given as digits [B, N] (most significant first)."""
    total = first.flip(1) + second.flip(1)  # least significant first
    out = []
    carry = torch.zeros_like(total[:, 0])
    for position in range(total.shape[1]):
        value = total[:, position] + carry
        out.append(value % 10)
        carry = value // 10
    out.append(carry)
    return torch.stack(out[::-1], dim=1)
