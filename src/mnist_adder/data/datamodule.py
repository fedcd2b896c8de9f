"""The LightningDataModule: MNIST images paired with a random number, batches of
(image, number_onehot, label, sum_onehot)."""

from collections.abc import Sequence
from typing import Any

import torch

from mnist_adder.config_checks import check_heldout_pairs
from mnist_adder.data.batches import EvalBatches, TrainBatches, draw_numbers
from mnist_adder.data.mnist import load_mnist, normalize, validation_split
from mnist_adder.data.task_data import TaskDataModule
from mnist_adder.heldout import heldout_table


class MnistSumDataModule(TaskDataModule):
    """MNIST images paired with a random number 0..9: batches of (image, number_onehot, label, sum_onehot).

    The keys every task's data has (`data_dir`, `batch_size`, `eval_batch_size`, `val_size`, `download`,
    `seed`, `split_seed`, `pair_seed`, `on_device`, `augment`) are `TaskDataModule`'s. The validation and
    test numbers come from `pair_seed` (validation's from `pair_seed + 1`). Training order and numbers
    come from `seed` (and the epoch, when `resample_numbers`).

    `heldout_pairs` (see mnist_adder.heldout) never occur in training or validation: the numbers that
    would form one are drawn again among the digit's other numbers. The test pairs stay as they are;
    `heldout_table` tells which of them were held out.
    """

    def __init__(
        self,
        *,
        resample_numbers: bool = True,
        heldout_pairs: str | Sequence[Sequence[int]] | None = None,
        **shared: Any,
    ) -> None:
        check_heldout_pairs(heldout_pairs)
        super().__init__(**shared)
        # (10, 10) bool on the CPU, True at [digit, number] for a held-out pair; None when none is held out.
        self.heldout_table = heldout_table(heldout_pairs)
        self.resample_numbers = resample_numbers
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._numbers: dict[str, torch.Tensor] = {}
        self._train_batches: TrainBatches | None = None
        self._train_resume_state: dict[str, int] | None = None  # from a checkpoint, for the next pass

    def setup(self, stage: str | None = None) -> None:
        device = self._device()
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            images, labels = load_mnist(self.data_dir, train=True)
            train_idx, val_idx = validation_split(len(labels), self.val_size, self.split_seed)
            images = normalize(images)
            self._splits["train"] = (images[train_idx].unsqueeze(1).to(device), labels[train_idx].to(device))
            self._splits["val"] = (images[val_idx].unsqueeze(1).to(device), labels[val_idx].to(device))
            self._numbers["val"] = draw_numbers(
                self.val_size, self.pair_seed + 1, labels[val_idx], self.heldout_table
            )
        if stage in (None, "test") and "test" not in self._splits:
            images, labels = load_mnist(self.data_dir, train=False)
            self._splits["test"] = (normalize(images).unsqueeze(1).to(device), labels.to(device))
            self._numbers["test"] = draw_numbers(len(labels), self.pair_seed)

    def _train_progress(self) -> tuple[int, bool]:
        # The trainer's own count of the batches trained in this pass (the loader is fetched one
        # ahead), and whether the pass is complete (limit_train_batches may end it early).
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done, done >= self.trainer.num_training_batches

    def state_dict(self) -> dict[str, Any]:
        # Saved in every checkpoint and restored before Lightning first iterates the training batches
        # (it does so early, to size the one-cycle schedule, and then never loads the loader's own state).
        return {"train_batches": self._train_batches.state_dict()} if self._train_batches is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_resume_state = state_dict.get("train_batches")

    def train_dataloader(self) -> TrainBatches:
        images, labels = self._splits["train"]
        rank, world_size = self._rank_and_world()
        batches = TrainBatches(
            images,
            labels,
            self.batch_size,
            seed=self.seed,
            resample_numbers=self.resample_numbers,
            epoch_fn=self._current_epoch if self.trainer is not None else None,
            progress_fn=self._train_progress if self.trainer is not None else None,
            rank=rank,
            world_size=world_size,
            augment=self.augment,
            heldout=self.heldout_table,
        )
        if self._train_resume_state is not None:
            batches.load_state_dict(self._train_resume_state)
            self._train_resume_state = None
        self._train_batches = batches
        return batches

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images [N, 1, 28, 28], labels [N]) of "train", "val" or "test", once `setup` has
        made it: what fits on the splits without batches of pairs ("not a digit") reads them here."""
        return self._splits[split]

    def _eval_batches(self, split: str) -> EvalBatches:
        images, labels = self._splits[split]
        rank, world_size = self._rank_and_world()
        return EvalBatches(images, labels, self._numbers[split], self.eval_batch_size, rank, world_size)
