"""A weighted mean metric that keeps its weights and never syncs the device while it updates."""

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """sum(value * weight) / sum(weight) over an epoch, summed across processes before dividing.

    torchmetrics' MeanMetric will not do here: its NaN checks sync the device on every update, and with
    them disabled (nan_strategy="disable") torchmetrics 1.9 replaces the weights by ones, which made the
    loss an unweighted mean of batch means and sum_given_digit_acc equal to sum_acc.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        value = value.detach().to(self.total.dtype)
        weight = torch.broadcast_to(
            torch.as_tensor(weight, dtype=value.dtype, device=value.device), value.shape
        )
        self.total += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight
