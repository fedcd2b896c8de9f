"""The LightningModule of MNIST addition (data=mnist_addition): the digits learned from sums alone.

Loss = -log P(true sum), P the exact distribution of the sum of the two N-digit numbers computed from
the 2N digit distributions (models/number_sum.py). No digit label reaches it: training batches hold
none (data/mnist_addition.py), and the module refuses a digit_weight other than 0.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import MeanMetric

from mnist_adder.models.number_sum import NumberSumNet, argmax_digit_sum, map_sums
from mnist_adder.training.task import StepResult, TaskModule


class NumberAdditionModule(TaskModule):
    """Trains `net`'s backbone from the sums of two N-digit numbers.

    Logs per epoch `{train,val,test}/loss` (the mean -log P(true sum)) and `{train,val,test}/sum_acc`,
    the field's usual prediction: the sum of the most probable digits, right or wrong as a whole.
    Validation and test, whose batches carry the digit labels for this only, also give `digit_acc`
    (the backbone's accuracy on every image of the examples). The test also gives `test/sum_acc_map`:
    the most probable sum under the exact distribution (`models.number_sum.map_sum`, exact, not an
    enumeration), and `test/sum_acc_ceiling` = digit_acc^(2N), what `sum_acc` would be if the errors of
    the 2N digits were independent.

    The recipe keys are `TaskModule`'s (conf/model/recipe/): the loss is `sum_weight` times the sum's
    NLL, and `digit_weight` must be 0 (the protocol gives the loss no digit label). `label_smoothing`
    must be 0: there is no fixed set of sum classes to smooth over. Its net has no temperatures and no
    "not a digit" detector: nothing is fitted after training.

    `entropy_weight` (beta): the training loss also subtracts beta * (1 - t) times the summed entropy of
    the example's 2N digit distributions, t the share of training done (so the term is gone at the end).
    It adds no label. Why: a digit read confidently wrong has a softmax probability near 0 for the true
    digit, and the gradient that would move mass there is proportional to that probability; a backbone
    that became sure of wrong digits early (the conv backbone reads each digit as a neighbour at some
    seeds) never leaves. Keeping the distributions spread while the digits are being learned keeps that
    gradient alive. 0: the exact -log P(true sum) alone.
    """

    task: ClassVar[str] = "mnist_addition"

    def __init__(
        self,
        net: NumberSumNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        digit_weight: float = 0.0,
        entropy_weight: float = 0.0,
        **recipe: Any,
    ) -> None:
        super().__init__(net, optimizer, digit_weight=digit_weight, **recipe)
        if not entropy_weight >= 0:
            raise ValueError(f"entropy_weight must be >= 0, not {entropy_weight}")
        self.entropy_weight = entropy_weight
        if digit_weight != 0:
            raise ValueError(
                f"digit_weight must be 0 in MNIST addition, not {digit_weight}: only the sum is a label"
            )
        if not self.sum_weight > 0:
            raise ValueError(f"sum_weight must be > 0, not {self.sum_weight}: it is the only loss")
        if self.label_smoothing != 0:
            raise ValueError(f"label_smoothing must be 0 in MNIST addition, not {self.label_smoothing}")
        # The most prefixes the MAP decoding kept at one position in the last test (how wide its exact
        # search had to be); in metrics.json as test/map_prefixes_max.
        self.map_prefixes_max = 0
        self.images_per_example = 0  # 2N, from the batches

    def _stage_metrics(self, stage: str) -> nn.Module:
        names = ["loss", "sum_acc"]
        if stage != "train":
            names.append("digit_acc")  # the batches of validation and test carry the digit labels
        if stage == "test":
            names.append("sum_acc_map")
        return nn.ModuleDict({name: MeanMetric() for name in names})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> StepResult:
        images, sums = batch[0], batch[1]
        self.images_per_example = images.shape[1]
        digit_logits = self._net_for(stage)(images)
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
        if stage != "train":
            return self.sum_weight * loss, None
        self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False)
        if self.entropy_weight > 0:
            log_probs = digit_logits.float().log_softmax(dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1).sum(dim=1).mean()  # per example
            done = self.global_step / max(1, self.trainer.estimated_stepping_batches)
            self.log("train/digit_entropy", entropy.detach() / images.shape[1], on_step=True, on_epoch=False)
            return self.sum_weight * loss - self.entropy_weight * max(0.0, 1.0 - done) * entropy, None
        return self.sum_weight * loss, None

    def _end_epoch(self, stage: str) -> None:
        # compute() has already reduced over all processes (see TaskModule._log_synced).
        metrics = self.stage_metrics[f"{stage}_metrics"]
        values = {f"{stage}/{name}": metric.compute() for name, metric in metrics.items()}
        if stage == "test":
            values["test/sum_acc_ceiling"] = values["test/digit_acc"] ** self.images_per_example
            values["test/map_prefixes_max"] = torch.tensor(float(self.map_prefixes_max))
        self._log_synced(values)
        for metric in metrics.values():
            metric.reset()

    def on_test_epoch_start(self) -> None:
        self.map_prefixes_max = 0
