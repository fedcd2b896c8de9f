"""The LightningDataModule: MNIST images paired with a random number, batches of
(image, number_onehot, label, sum_onehot)."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mnist_adder.config_checks import check_heldout_pairs
from mnist_adder.data.batches import EvalBatches, TrainBatches, draw_numbers
from mnist_adder.data.mnist import ensure_mnist, load_mnist, normalize, validation_split
from mnist_adder.heldout import heldout_table


class MnistSumDataModule(pl.LightningDataModule):
    """MNIST held in memory as normalised tensors, split into train/val, with the test set kept apart.

    The validation split and the validation/test numbers come from `split_seed` and `pair_seed`, not
    from the run's `seed`: every run, whatever its seed, is selected and tested on the same pairs.
    Training order and numbers come from `seed` (and the epoch, when `resample_numbers`).

    `heldout_pairs` (see mnist_adder.heldout) never occur in training or validation: the numbers that
    would form one are drawn again among the digit's other numbers. The test pairs stay as they are;
    `heldout_table` tells which of them were held out.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 256,
        eval_batch_size: int = 2000,
        val_size: int = 5000,
        download: bool = True,
        resample_numbers: bool = True,
        seed: int = 0,
        split_seed: int = 0,
        pair_seed: int = 1234,
        on_device: bool = True,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        heldout_pairs: str | Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        check_heldout_pairs(heldout_pairs)
        # (10, 10) bool on the CPU, True at [digit, number] for a held-out pair; None when none is held out.
        self.heldout_table = heldout_table(heldout_pairs)
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size = val_size
        self.download, self.resample_numbers = download, resample_numbers
        self.seed, self.split_seed, self.pair_seed = seed, split_seed, pair_seed
        self.on_device = on_device
        self.augment = augment
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._numbers: dict[str, torch.Tensor] = {}
        self._train_batches: TrainBatches | None = None
        self._train_resume_state: dict[str, int] | None = None  # from a checkpoint, for the next pass

    def prepare_data(self) -> None:
        ensure_mnist(self.data_dir, self.download)

    def _device(self) -> torch.device:
        # With the data on the accelerator a step is one gather, no host-to-device copy.
        if self.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

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

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int:
        # overfit_batches (debug=overfit) must see the same batches every epoch: Lightning turns off the
        # shuffling of a DataLoader for it; ours shuffles by epoch, so it stays at epoch 0's order.
        if self.trainer.overfit_batches > 0:
            return 0
        return self.trainer.current_epoch

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

    def val_dataloader(self) -> EvalBatches:
        return self._eval_batches("val")

    def test_dataloader(self) -> EvalBatches:
        return self._eval_batches("test")
