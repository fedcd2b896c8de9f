"""`TaskDataModule`: what the two tasks' LightningDataModules share (`data/datamodule.py`'s (image, number)
pairs, `data/mnist_addition.py`'s MNIST addition): MNIST on disk, the seeds, where the tensors live, the
rank's share of the batches and the validation and test loaders."""

from collections.abc import Callable, Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch

from mnist_adder.data.mnist import ensure_mnist

# The defaults of both tasks' data (conf/data/ sets them too): the validation split's size, carved from
# the 60,000 training images, and the seed of the fixed test draws (validation's is pair_seed + 1).
VAL_SIZE = 5000
PAIR_SEED = 1234


class TaskDataModule(pl.LightningDataModule):
    """MNIST held in memory, split into train/val by `val_size` and `split_seed`, the test set kept apart.

    What is drawn for validation and test (numbers, or how the images are cut into examples) comes from
    `pair_seed`, not from the run's `seed`: every run, whatever its seed, is selected and tested on the
    same data. `download`: fetch MNIST into `data_dir` when it is missing (`prepare_data`). `on_device`:
    the tensors on the trainer's accelerator. `augment`: what training batches go through.

    A subclass makes its splits in `setup` and its batches in `train_dataloader` and `_eval_batches`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 256,
        eval_batch_size: int = 2000,
        val_size: int = VAL_SIZE,
        download: bool = True,
        seed: int = 0,
        split_seed: int = 0,
        pair_seed: int = PAIR_SEED,
        on_device: bool = True,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.download = val_size, download
        self.seed, self.split_seed, self.pair_seed = seed, split_seed, pair_seed
        self.on_device, self.augment = on_device, augment

    def prepare_data(self) -> None:
        ensure_mnist(self.data_dir, self.download)

    def _device(self) -> torch.device:
        # With the data on the accelerator a step is one gather, no host-to-device copy.
        if self.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

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

    def _eval_batches(self, split: str) -> Iterable:
        """The batches of "val" or "test", this rank's share of them."""
        raise NotImplementedError

    def val_dataloader(self) -> Iterable:
        return self._eval_batches("val")

    def test_dataloader(self) -> Iterable:
        return self._eval_batches("test")
