"""The LightningModule of MNIST addition (data=mnist_addition): the digits learned from sums alone.

Loss = -log P(true sum), P the exact distribution of the sum of the two N-digit numbers computed from
the 2N digit distributions (models/number_sum.py). No digit label reaches it: training batches hold
none (data/mnist_addition.py), and the module refuses a digit_weight other than 0.
"""

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from mnist_adder.models.number_sum import NumberSumNet, argmax_digit_sum, map_sums
from mnist_adder.training.module import configure_optimizers
from mnist_adder.training.step_speed import CompiledNet, compile_net, mark_step_begin, to_channels_last

STAGES = ("train", "val", "test")


class NumberAdditionModule(pl.LightningModule):
    """Trains `net`'s backbone from the sums of two N-digit numbers.

    Logs per epoch `{train,val,test}/loss` (the mean -log P(true sum)) and `{train,val,test}/sum_acc`,
    the field's usual prediction: the sum of the most probable digits, right or wrong as a whole.
    Validation and test, whose batches carry the digit labels for this only, also give `digit_acc`
    (the backbone's accuracy on every image of the examples). The test also gives `test/sum_acc_map`:
    the most probable sum under the exact distribution (`models.number_sum.map_sum`, exact, not an
    enumeration), and `test/sum_acc_ceiling` = digit_acc^(2N), what `sum_acc` would be if the errors of
    the 2N digits were independent.

    `digit_weight` and `sum_weight` are the recipe's (conf/model/recipe/): the loss is `sum_weight` times
    the sum's NLL, and `digit_weight` must be 0 (the protocol gives the loss no digit label).
    `label_smoothing` must be 0: there is no fixed set of sum classes to smooth over.
    """

    def __init__(
        self,
        net: NumberSumNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        digit_weight: float = 0.0,
        sum_weight: float = 1.0,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if digit_weight != 0:
            raise ValueError(
                f"digit_weight must be 0 in MNIST addition, not {digit_weight}: only the sum is a label"
            )
        if not sum_weight > 0:
            raise ValueError(f"sum_weight must be > 0, not {sum_weight}: it is the only loss")
        if label_smoothing != 0:
            raise ValueError(f"label_smoothing must be 0 in MNIST addition, not {label_smoothing}")
        self.net = net
        # How the training steps run, as DigitSumModule's (training/step_speed.py).
        self.compile_training, self.compile_mode, self.channels_last = compile, compile_mode, channels_last
        self._compiled = CompiledNet()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sum_weight, self.scheduler_interval = sum_weight, scheduler_interval
        # Not named after the stages: nn.ModuleDict refuses the key "train" (it is a method).
        self.stage_metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": nn.ModuleDict({"loss": MeanMetric(), "sum_acc": MeanMetric()})
                for stage in STAGES
            }
        )
        for stage in ("val", "test"):
            self.stage_metrics[f"{stage}_metrics"]["digit_acc"] = MeanMetric()
        self.stage_metrics["test_metrics"]["sum_acc_map"] = MeanMetric()
        # The most prefixes the MAP decoding kept at one position in the last test (how wide its exact
        # search had to be); in metrics.json as test/map_prefixes_max.
        self.map_prefixes_max = 0
        self.images_per_example = 0  # 2N, from the batches
        # What train.py reads of every module: no per-class lists here.
        self.per_class_results: dict[str, list[float]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        images, sums = batch[0], batch[1]
        self.images_per_example = images.shape[1]
        if stage == "train" and self._compiled.fn is not None:
            mark_step_begin(self.compile_mode)
            digit_logits = self._compiled.fn(images)
        else:
            digit_logits = self.net(images)
        loss = -self.net.sum_log_prob(digit_logits, sums).mean()
        metrics = self.stage_metrics[f"{stage}_metrics"]
        with torch.no_grad():
            metrics["loss"].update(loss.detach())
            metrics["sum_acc"].update((argmax_digit_sum(digit_logits) == sums).all(dim=1).float())
            if stage != "train":
                labels = batch[2]  # only to measure the backbone: the loss above never sees them
                metrics["digit_acc"].update((digit_logits.argmax(dim=-1) == labels).float())
            if stage == "test":
                decoded, widest = map_sums(self.net.pair_sum_log_probs(digit_logits))
                metrics["sum_acc_map"].update((decoded == sums).all(dim=1).float())
                self.map_prefixes_max = max(self.map_prefixes_max, widest)
        if stage == "train":
            self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False)
        return self.sum_weight * loss

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.channels_last:
            to_channels_last(self.net)
        if self.compile_training:
            self._compiled.fn = compile_net(self.net, self.compile_mode)

    def on_fit_end(self) -> None:
        self._compiled.fn = None  # the test reads the eager network

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        # compute() has already reduced over all processes (see DigitSumModule._log_synced).
        metrics = self.stage_metrics[f"{stage}_metrics"]
        values = {f"{stage}/{name}": metric.compute() for name, metric in metrics.items()}
        if stage == "test":
            values["test/sum_acc_ceiling"] = values["test/digit_acc"] ** self.images_per_example
            values["test/map_prefixes_max"] = torch.tensor(float(self.map_prefixes_max))
        self.log_dict(values, sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self.map_prefixes_max = 0

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
