"""A callback that shows what the model gets wrong, per validation epoch, as TensorBoard images.

It works from the predictions `DigitSumModule.validation_step` returns, so it adds no forward pass and
nothing to training steps: confusion matrices of both heads (with each class's accuracy) and a grid of
misclassified validation images with their true and predicted labels.
"""

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS
from mnist_adder.data.batches import Batch
from mnist_adder.render import confusion_matrix_figure, misclassified_grid


class ValidationImages(pl.Callback):
    """Logs `val/digit_confusion`, `val/sum_confusion` and `val/misclassified` images every epoch.

    `max_images` caps the misclassified grid (the first ones in validation order, so epochs compare).
    Without a TensorBoard logger it does nothing. `matrices` holds the last epoch's confusion matrices
    (rows: true class, columns: predicted), by head.
    """

    def __init__(self, max_images: int = 48) -> None:
        super().__init__()
        self.max_images = max_images
        self._confusion: dict[str, MulticlassConfusionMatrix] = {}
        self._wrong: list[tuple[torch.Tensor, ...]] = []
        self._num_wrong = 0
        self._active = False
        self.matrices: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The same decision on every process: the matrices are synced across them at the end.
        self._active = self._tensorboard(trainer) is not None and not trainer.sanity_checking
        if not self._active:
            return
        if not self._confusion:
            # validate_args=False: the checks would sync the device on every batch.
            self._confusion = {
                head: MulticlassConfusionMatrix(num_classes, validate_args=False)
                for head, num_classes in (("digit", NUM_DIGITS), ("sum", NUM_SUMS))
            }
        for matrix in self._confusion.values():
            matrix.to(pl_module.device).reset()
        self._wrong, self._num_wrong = [], 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or not isinstance(outputs, dict):
            return
        image, number_onehot, label, sum_onehot = batch
        digit_pred, sum_pred = outputs["digit_pred"], outputs["sum_pred"]
        sum_label = sum_onehot.argmax(dim=-1)
        self._confusion["digit"].update(digit_pred, label)
        self._confusion["sum"].update(sum_pred, sum_label)
        if self._num_wrong < self.max_images:  # once the grid is full, no more device syncs
            wrong = ((digit_pred != label) | (sum_pred != sum_label)).nonzero().squeeze(1)
            wrong = wrong[: self.max_images - self._num_wrong]
            number = number_onehot.argmax(dim=-1)
            self._wrong.append(tuple(t[wrong].cpu() for t in (image, label, number, digit_pred, sum_pred)))
            self._num_wrong += len(wrong)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self.matrices = {head: matrix.compute().cpu() for head, matrix in self._confusion.items()}  # synced
        tensorboard = self._tensorboard(trainer)
        if not trainer.is_global_zero or tensorboard is None:
            return
        writer, step, epoch = tensorboard.experiment, trainer.global_step, trainer.current_epoch
        for head, matrix in self.matrices.items():
            title = f"{head}: true (rows) vs predicted (columns), validation, epoch {epoch}"
            # add_figure renders the matplotlib figure (Agg) to an image and closes it.
            writer.add_figure(f"val/{head}_confusion", confusion_matrix_figure(matrix, title), step)
        if self._num_wrong:
            images, labels, numbers, digit_preds, sum_preds = (
                torch.cat(parts) for parts in zip(*self._wrong, strict=True)
            )
            grid = misclassified_grid(
                images, labels.tolist(), numbers.tolist(), digit_preds.tolist(), sum_preds.tolist()
            )
            writer.add_image("val/misclassified", grid, step, dataformats="HWC")
        self._wrong = []
