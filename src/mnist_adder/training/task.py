"""What a task gives the training pipeline: `TaskModule`, the Lightning code both tasks share and the
questions `train()` asks of whichever task it holds.

A task is a LightningModule that subclasses `TaskModule` (`training/module.py`'s DigitSumModule, the
(image, number) -> (digit, sum) network; `training/addition_module.py`'s NumberAdditionModule, MNIST
addition). It writes its loss and metrics (`_step`, `_end_epoch`); the base holds the recipe keys
(conf/model/recipe/), how the training steps run (compile, channels-last), the optimizer and schedule,
the step and epoch hooks, and the interface below. `train()` reads a task through that interface only:
it never asks which task it holds.

The interface:
- `task`: which task it is, a key of `TASK_TITLES`. The tools that load a checkpoint (eval, predict,
  export, calibrate, the demo, benchmark) read it to take the task's own path, or to refuse with one line
  a checkpoint of a task they have no use for (`inference/checkpoint.py`).
- `has_temperatures`: the net's digit and sum heads have temperatures, fitted after training
  (`postfit/temperature.py`, `calibrate`): then `temperatures`, `set_temperatures` and
  `calibration_results` (the test's reliability bins) are the task's.
- `has_not_digit_detector`: the net has a "not a digit" detector fitted after training
  (`postfit/not_digit.py`, `not_digit_accept`).
- `test_result_lists()`: the last test's results that are not scalars (the loggers take scalars only),
  for metrics.json.
"""

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from mnist_adder.training.step_speed import (
    CompiledNet,
    compile_net,
    make_optimizer,
    mark_step_begin,
    to_channels_last,
)

STAGES = ("train", "val", "test")

# Each task's key (`TaskModule.task`) and how messages name it.
TASK_TITLES = {
    "digit_sum": "the (image, number) -> (digit, sum) task",
    "mnist_addition": "MNIST addition (two N-digit numbers as images)",
}

# A step's loss, and what validation hands to callbacks' on_validation_batch_end (None: nothing).
StepResult = tuple[torch.Tensor, dict[str, torch.Tensor] | None]


class TaskModule(pl.LightningModule):
    """The shared base of the tasks' LightningModules: the recipe, the step dispatch, the optimizers.

    The recipe keys (conf/model/recipe/, shared by every model): `optimizer` and `scheduler` (partial
    constructors; `scheduler_interval`, "step" or "epoch"), `digit_weight` and `sum_weight` (the weights
    of the loss terms; a task may refuse values it has no use for), `label_smoothing` (training loss
    only), and how the training steps run: `compile` (the training steps run the network through
    `torch.compile`, `compile_mode` its mode; validation, test and everything after fit run it
    eagerly, and the weights, state dict and checkpoints are the eager network's) and `channels_last`
    (the weights in channels-last memory order from the start of fit); both off by default
    (`mnist_adder.training.step_speed`, docs/speed.md).

    A subclass gives `_step(batch, stage)`, the loss of a batch of a stage in `STAGES` (and updates that
    stage's metrics), and `_end_epoch(stage)`, which logs and resets them at the end of the stage's
    epoch; the class attributes and methods of the interface (the module's docstring) say the rest.
    """

    task: ClassVar[str] = ""
    has_temperatures: ClassVar[bool] = False
    has_not_digit_detector: ClassVar[bool] = False

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        digit_weight: float = 1.0,
        sum_weight: float = 1.0,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.digit_weight, self.sum_weight = digit_weight, sum_weight
        # Training loss only: validation and test losses stay plain cross-entropy, comparable across recipes.
        self.label_smoothing = label_smoothing
        self.compile_training, self.compile_mode = compile, compile_mode
        self.channels_last = channels_last
        self._compiled = CompiledNet()  # set for the training steps of a fit (setup), None otherwise
        # Not named after the stages: nn.ModuleDict refuses the key "train" (it is a method).
        self.stage_metrics = nn.ModuleDict(
            {f"{stage}_metrics": self._stage_metrics(stage) for stage in STAGES}
        )
        # The last test's reliability-diagram bins per head, e.g. {"test/digit_reliability": {...}}: filled
        # by a task with temperatures, read by train() and calibrate around the temperatures' fit.
        self.calibration_results: dict[str, dict[str, list[float]]] = {}

    # What a task writes.

    def _stage_metrics(self, stage: str) -> nn.Module:
        """The metrics one stage's steps update (in `stage_metrics[f"{stage}_metrics"]`)."""
        raise NotImplementedError

    def _step(self, batch: Any, stage: str) -> StepResult:
        """The loss of one batch of `stage` and what validation hands to callbacks; updates the metrics."""
        raise NotImplementedError

    def _end_epoch(self, stage: str) -> None:
        """Log the stage's epoch values and reset its metrics."""
        raise NotImplementedError

    # The interface train() reads after the test.

    def test_result_lists(self) -> dict[str, Any]:
        """The last test's results that are not scalars, by metrics.json key (none by default)."""
        return {}

    def temperatures(self) -> tuple[float, float]:
        """The (digit, sum) heads' temperatures: only a task with `has_temperatures` has them."""
        raise NotImplementedError(f"{type(self).__name__} has no temperatures")

    def set_temperatures(self, digit: float, sum_: float) -> None:
        """Set both heads' temperatures (> 0; 1 and 1 give the raw logits), as `temperatures` reads them."""
        raise NotImplementedError(f"{type(self).__name__} has no temperatures")

    # The shared Lightning code.

    def _net_for(self, stage: str) -> Callable[..., Any]:
        """The network a step of `stage` runs: the compiled one for a fit's training steps, if any."""
        if stage == "train" and self._compiled.fn is not None:
            mark_step_begin(self.compile_mode)
            return self._compiled.fn
        return self.net

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.channels_last:
            to_channels_last(self.net)
        if self.compile_training:
            self._compiled.fn = compile_net(self.net, self.compile_mode)

    def on_fit_end(self) -> None:
        # The test and the post-training fits after it read the eager network: one compile per fit.
        self._compiled.fn = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        # What it returns goes to callbacks' on_validation_batch_end (confusion matrices, misclassified
        # images).
        return self._step(batch, "val")[1]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._end_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def _log_synced(self, values: dict[str, torch.Tensor]) -> None:
        """Log epoch values that a torchmetrics compute() has already reduced over all processes.

        Each process then holds the number of the whole dataset, the same on all of them. sync_dist=True
        tells Lightning so (without it, it warns that epoch values are not synced under DDP): its
        reduction, the mean over processes of one and the same number, gives that number back (exactly
        for 2, 4, 8... processes, to float rounding for others) at the cost of one all-reduce of a
        scalar per value and epoch. Logging the Metric objects instead (Lightning computes and resets
        them) does not fit: one DigitSumMetrics computes seven values from one synced state, and the
        calibration metrics' states are read again for the reliability bins before their reset.
        """
        self.log_dict(values, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """The optimizer and schedule of `optimizer`, `scheduler` and `scheduler_interval`: fused (one
        kernel per update, its step count on the device) where the device has it; a schedule that spans
        the run (OneCycleLR) gets its length from the Trainer."""
        optimizer = make_optimizer(self.optimizer_factory, self.parameters(), self.device)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            kwargs["total_steps"] = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
