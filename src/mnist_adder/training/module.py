"""The LightningModule: trains both heads of a DigitSumNet with one joint loss."""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS
from mnist_adder.data.batches import Batch
from mnist_adder.heldout import heldout_sums
from mnist_adder.models.digit_sum import TEMPERATURES, DigitSumNet
from mnist_adder.training.metrics import (
    DigitSumMetrics,
    HeldoutPairSumAccuracy,
    SumCoherenceGap,
    calibration_error,
    reliability_bins,
)
from mnist_adder.training.task import StepResult, TaskModule

# Accuracy of each head per true class, for validation and test only (training steps stay as they were).
PER_CLASS_STAGES = ("val", "test")
PER_CLASS_METRICS = {"digit_acc_per_class": NUM_DIGITS, "sum_acc_per_class": NUM_SUMS}
# Expected calibration error of each head, on the test set only: it keeps one confidence per sample.
CALIBRATION_STAGES = ("test",)
CALIBRATION_METRICS = {"digit_ece": NUM_DIGITS, "sum_ece": NUM_SUMS}


def _per_class_metrics() -> nn.ModuleDict:
    # validate_args=False: the argument checks would sync the device on every validation batch.
    return nn.ModuleDict(
        {
            name: MulticlassAccuracy(num_classes, average=None, validate_args=False)
            for name, num_classes in PER_CLASS_METRICS.items()
        }
    )


def _calibration_metrics() -> nn.ModuleDict:
    return nn.ModuleDict({name: calibration_error(n) for name, n in CALIBRATION_METRICS.items()})


class DigitSumModule(TaskModule):
    """Loss = digit_weight * CE(digit_logits, label) + sum_weight * CE(sum_logits, label + number).

    Logs `{train,val,test}/{loss,digit_loss,sum_loss,digit_acc,sum_acc,both_acc,sum_given_digit_acc}`
    per epoch; `sum_given_digit_acc` is the sum accuracy among samples whose digit is right, i.e.
    how well the adder adds. Validation and test also give the per-class accuracy of each head,
    `{val,test}/{digit,sum}_acc_per_class` (lists of 10 and 19), in `per_class_results` and as one
    scalar per class in the loggers (`{stage}/{name}/<class>`).

    When the datamodule holds (digit, number) pairs out of training (`data.heldout_pairs`), the test also
    gives `test/sum_acc_seen_pairs` and `test/sum_acc_unseen_pairs`: the sum accuracy on the test samples
    whose pair training did and did not see; and when whole sums are held out (every pair of a sum),
    `test/sum_acc_unseen_sums`: the sum accuracy on the test samples whose sum training never saw.

    The test also gives `test/sum_coherence_gap`: the mean |P(sum = s) - P(digit = s - n)| at the
    predicted sum s, how far the sum's confidence strays from the digit's it must come from.

    The test also gives the expected calibration error of each head, `test/{digit,sum}_ece` (15 bins,
    L1), and keeps the bins of its reliability diagram in `calibration_results`
    (`test/{digit,sum}_reliability`).

    The recipe keys (`optimizer`, `scheduler`, `digit_weight`, `sum_weight`, `label_smoothing`,
    `compile`, `compile_mode`, `channels_last`) are `TaskModule`'s. Its net has temperatures and a
    "not a digit" detector, fitted after training (`mnist_adder.postfit`).
    """

    task: ClassVar[str] = "digit_sum"
    has_temperatures: ClassVar[bool] = True
    has_not_digit_detector: ClassVar[bool] = True

    def __init__(
        self, net: DigitSumNet, optimizer: Callable[..., torch.optim.Optimizer], **recipe: Any
    ) -> None:
        super().__init__(net, optimizer, **recipe)
        self.per_class_metrics = nn.ModuleDict(
            {f"{stage}_per_class": _per_class_metrics() for stage in PER_CLASS_STAGES}
        )
        # The last epoch's per-class accuracies per stage, e.g. {"test/digit_acc_per_class": [10 floats]}.
        self.per_class_results: dict[str, list[float]] = {}
        # Its states are not saved: checkpoints from before it existed load unchanged.
        self.heldout_pair_metrics = HeldoutPairSumAccuracy()
        # (10, 10) bool, True at [digit, number] for a pair held out of training: taken from the
        # datamodule when a test starts (None: nothing held out, no seen/unseen split).
        self.heldout_table: torch.Tensor | None = None
        # [19] bool, True for a sum none of whose pairs training saw (set with heldout_table).
        self.heldout_sum_table: torch.Tensor | None = None
        self.sum_coherence = SumCoherenceGap()
        self.calibration_metrics = nn.ModuleDict(
            {f"{stage}_calibration": _calibration_metrics() for stage in CALIBRATION_STAGES}
        )

    def _stage_metrics(self, stage: str) -> nn.Module:
        return DigitSumMetrics()

    def forward(self, image: torch.Tensor, number_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image, number_onehot)

    def _step(self, batch: Batch, stage: str) -> StepResult:
        """Loss and {"digit_pred", "sum_pred"} of one batch; updates the stage's metrics."""
        image, number_onehot, label, sum_onehot = batch
        if stage == "val" and getattr(self.net, "test_shifts", False):
            # Validation is part of training (checkpoint selection, early stopping) and its time counts
            # in the fit: it reads the plain net; test-time shifts are for test and use.
            digit_logits, sum_logits = self.net(image, number_onehot, shifts=False)
        else:
            digit_logits, sum_logits = self._net_for(stage)(image, number_onehot)
        sum_label = sum_onehot.argmax(dim=-1)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        digit_loss = F.cross_entropy(digit_logits, label, label_smoothing=smoothing)
        sum_loss = F.cross_entropy(sum_logits, sum_label, label_smoothing=smoothing)
        loss = self.digit_weight * digit_loss + self.sum_weight * sum_loss

        with torch.no_grad():
            digit_pred, sum_pred = digit_logits.argmax(dim=-1), sum_logits.argmax(dim=-1)
            digit_right, sum_right = digit_pred == label, sum_pred == sum_label
            self.stage_metrics[f"{stage}_metrics"].update(loss, digit_loss, sum_loss, digit_right, sum_right)
            if stage in PER_CLASS_STAGES:
                per_class = self.per_class_metrics[f"{stage}_per_class"]
                per_class["digit_acc_per_class"].update(digit_pred, label)
                per_class["sum_acc_per_class"].update(sum_pred, sum_label)
            if stage == "test" and self.heldout_table is not None:
                unseen_pair = self.heldout_table[label, number_onehot.argmax(dim=-1)]
                self.heldout_pair_metrics.update(sum_right, unseen_pair, self.heldout_sum_table[sum_label])
            if stage == "test":
                self.sum_coherence.update(
                    digit_logits.float().softmax(dim=-1),
                    sum_logits.float().softmax(dim=-1),
                    number_onehot.argmax(dim=-1),
                )
            if stage in CALIBRATION_STAGES:
                # Probabilities in float32 (the logits may be bf16 under autocast), as predict reports them.
                calibration = self.calibration_metrics[f"{stage}_calibration"]
                calibration["digit_ece"].update(digit_logits.float().softmax(dim=-1), label)
                calibration["sum_ece"].update(sum_logits.float().softmax(dim=-1), sum_label)
        if stage == "train":
            self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False)
        return loss, {"digit_pred": digit_pred, "sum_pred": sum_pred}

    def _log_epoch(self, stage: str) -> None:
        # Logged once per epoch from the accumulated sums: no per-step logging cost.
        metrics = self.stage_metrics[f"{stage}_metrics"]
        self._log_synced({f"{stage}/{name}": value for name, value in metrics.compute().items()})
        metrics.reset()

    def _end_per_class_epoch(self, stage: str) -> None:
        # Lightning's self.log takes scalars only: the per-class vectors are computed (and synced across
        # processes) here, kept for metrics.json and written to the loggers as one scalar per class.
        scalars = {}
        for name, metric in self.per_class_metrics[f"{stage}_per_class"].items():
            values = metric.compute().tolist()
            metric.reset()
            self.per_class_results[f"{stage}/{name}"] = values
            scalars |= {f"{stage}/{name}/{cls}": value for cls, value in enumerate(values)}
        if not self.trainer.sanity_checking:
            for logger in self.loggers:
                logger.log_metrics(scalars, step=self.global_step)

    def on_test_epoch_start(self) -> None:
        # The held-out pairs belong to the data: the datamodule that builds the test batches (from the
        # run config, also in scripts/eval.py) says which; plain dataloaders hold nothing out.
        self.set_heldout_table(getattr(self.trainer.datamodule, "heldout_table", None))

    def set_heldout_table(self, table: torch.Tensor | None) -> None:
        """Split the test sum accuracy by the (10, 10) table of pairs held out of training (None: none)."""
        self.heldout_table = table.to(self.device) if table is not None else None
        self.heldout_sum_table = heldout_sums(self.heldout_table) if table is not None else None

    def heldout_results(self) -> dict[str, torch.Tensor]:
        """The test's sum accuracy on seen and unseen pairs, and on unseen sums if any sum was held out."""
        results = self.heldout_pair_metrics.compute()
        if not self.heldout_sum_table.any():  # every sum was seen in training: no such group, no key
            del results["sum_acc_unseen_sums"]
        return {f"test/{name}": value for name, value in results.items()}

    def _end_calibration_epoch(self, stage: str) -> None:
        for name, metric in self.calibration_metrics[f"{stage}_calibration"].items():
            self._log_synced({f"{stage}/{name}": metric.compute()})
            with metric.sync_context():  # every process's samples, as compute() saw them
                bins = reliability_bins(metric.confidences, metric.accuracies, metric.n_bins)
            self.calibration_results[f"{stage}/{name.removesuffix('_ece')}_reliability"] = bins
            metric.reset()

    def _end_epoch(self, stage: str) -> None:
        self._log_epoch(stage)
        if stage in PER_CLASS_STAGES:
            self._end_per_class_epoch(stage)
        if stage != "test":
            return
        if self.heldout_table is not None:
            self._log_synced(self.heldout_results())
            self.heldout_pair_metrics.reset()
        self._log_synced({"test/sum_coherence_gap": self.sum_coherence.compute()})
        self.sum_coherence.reset()
        self._end_calibration_epoch("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The temperatures are fitted after training (mnist_adder.postfit): a run that trains on from a
        # calibrated checkpoint trains the raw logits, as the run that wrote it did, and fits them again at
        # its end. Called before the weights (and weight averaging's copies of them) are loaded.
        if self._trainer is None or self._trainer.state.fn != TrainerFn.FITTING:
            return
        for key in ("state_dict", "current_model_state"):
            weights = checkpoint.get(key)
            for name in TEMPERATURES:
                if isinstance(weights, dict) and f"net.{name}" in weights:
                    weights[f"net.{name}"] = torch.ones_like(weights[f"net.{name}"])

    def test_result_lists(self) -> dict[str, Any]:
        # Lists of 10 and 19 per-class accuracies: in metrics.json, not in the hparams tab (scalars only).
        return {k: v for k, v in self.per_class_results.items() if k.startswith("test/")}

    def temperatures(self) -> tuple[float, float]:
        return self.net.temperatures()

    def set_temperatures(self, digit: float, sum_: float) -> None:
        self.net.set_temperatures(digit, sum_)
