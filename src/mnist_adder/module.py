"""The LightningModule: trains both heads of a DigitSumNet with one joint loss."""

import inspect
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from mnist_adder.data.batches import Batch
from mnist_adder.models.digit_sum import DigitSumNet

STAGES = ("train", "val", "test")
METRICS = ("loss", "digit_loss", "sum_loss", "digit_acc", "sum_acc", "both_acc", "sum_given_digit_acc")


class _WeightedMean(MeanMetric):
    """MeanMetric's weighted mean without its NaN check, which would force a device sync on every step.

    MeanMetric itself cannot skip the check: with nan_strategy="disable" torchmetrics 1.9 drops the weights
    (every batch's loss would count alike, and sum_given_digit_acc would be plain sum_acc).
    """

    def update(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        value = value.to(self.dtype)
        weight = torch.broadcast_to(
            torch.as_tensor(weight, dtype=self.dtype, device=value.device), value.shape
        )
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


def _stage_metrics() -> nn.ModuleDict:
    # Every metric is a weighted mean of per-sample values, so one cheap, DDP-aware kind does them all.
    return nn.ModuleDict({name: _WeightedMean() for name in METRICS})


class DigitSumModule(pl.LightningModule):
    """Loss = digit_weight * CE(digit_logits, label) + sum_weight * CE(sum_logits, label + number).

    Logs `{train,val,test}/{loss,digit_loss,sum_loss,digit_acc,sum_acc,both_acc,sum_given_digit_acc}`
    per epoch; `sum_given_digit_acc` is the sum accuracy among samples whose digit is right, i.e.
    how well the adder adds.
    """

    def __init__(
        self,
        net: DigitSumNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        digit_weight: float = 1.0,
        sum_weight: float = 1.0,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.digit_weight, self.sum_weight = digit_weight, sum_weight
        self.scheduler_interval = scheduler_interval
        # Not named after the stages: nn.ModuleDict refuses the key "train" (it is a method).
        self.stage_metrics = nn.ModuleDict({f"{stage}_metrics": _stage_metrics() for stage in STAGES})

    def forward(self, image: torch.Tensor, number_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image, number_onehot)

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        image, number_onehot, label, sum_onehot = batch
        digit_logits, sum_logits = self.net(image, number_onehot)
        sum_label = sum_onehot.argmax(dim=-1)
        digit_loss = F.cross_entropy(digit_logits, label)
        sum_loss = F.cross_entropy(sum_logits, sum_label)
        loss = self.digit_weight * digit_loss + self.sum_weight * sum_loss

        with torch.no_grad():
            digit_right = digit_logits.argmax(dim=-1) == label
            sum_right = sum_logits.argmax(dim=-1) == sum_label
            metrics = self.stage_metrics[f"{stage}_metrics"]
            batch_size = label.shape[0]
            metrics["loss"].update(loss.detach(), batch_size)
            metrics["digit_loss"].update(digit_loss.detach(), batch_size)
            metrics["sum_loss"].update(sum_loss.detach(), batch_size)
            metrics["digit_acc"].update(digit_right.float())
            metrics["sum_acc"].update(sum_right.float())
            metrics["both_acc"].update((digit_right & sum_right).float())
            metrics["sum_given_digit_acc"].update(sum_right.float(), digit_right.float())
            # Metric objects: Lightning computes (and syncs across processes) once per epoch.
            self.log_dict(
                {f"{stage}/{name}": metric for name, metric in metrics.items()},
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )
        if stage == "train":
            self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        # Schedules that span the run (OneCycleLR) need its length, known only once the Trainer is set.
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            kwargs["total_steps"] = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
