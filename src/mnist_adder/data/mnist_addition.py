"""MNIST addition, the neuro-symbolic field's benchmark (DeepProbLog, 2018): two N-digit numbers, each
written as N MNIST images, and only their sum as the label.

The protocol as the field runs it: the training images are shuffled once (seeded) and cut into examples
of 2N images, the first N the digits of the first number (most significant first), the next N those
of the second; the label is the sum, and nothing else reaches the loss. The project's validation split
(`val_size` images carved by `split_seed`, as in `MnistSumDataModule`) is cut the same way, once, by
`pair_seed + 1` (`val_size=0`: none, and all 60,000 images train, the papers' counts); the test set is
cut once from the 10,000 test images by `pair_seed`. Validation and test are the same for every run;
the training examples are the run's `seed`'s.

Batches are tensors cut from tensors held in memory (on the accelerator when there is one), as in
`data.batches`: training batches are (images [B, 2N, 1, 28, 28], sum digits [B, N + 1]) with no digit
label in them at all; validation and test batches add the digit labels [B, 2N], only to measure the
backbone (`test/digit_acc`). The sum is held as its N + 1 digits (most significant first), not as an
integer: at N = 100 it would not fit in int64.
"""

from collections.abc import Callable, Iterator
from typing import Any

import torch

from mnist_adder.config_checks import check_addition_digits
from mnist_adder.data.batches import StridedBatches, augment_seed, epoch_seed
from mnist_adder.data.mnist import load_mnist, normalize, validation_split
from mnist_adder.data.task_data import TaskDataModule
from mnist_adder.digit_numbers import add_digits

TrainBatch = tuple[torch.Tensor, torch.Tensor]
EvalBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cut_examples(
    images: torch.Tensor, labels: torch.Tensor, digits: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle `images` [M, 1, 28, 28] and their digit `labels` [M] once by `seed` and cut them into
    floor(M / 2N) examples: (images [E, 2N, 1, 28, 28], digit labels [E, 2N], sum digits [E, N + 1]).
    The images left over (fewer than 2N) are not used."""
    per_example = 2 * digits
    count = len(labels) // per_example
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[: count * per_example].to(labels.device)
    example_images = images[order].view(count, per_example, *images.shape[1:])
    example_labels = labels[order].view(count, per_example)
    sums = add_digits(example_labels[:, :digits], example_labels[:, digits:])
    return example_images, example_labels, sums


class AdditionTrainBatches:
    """Training batches of whole examples, in an order drawn from (seed, epoch): a resumed or repeated
    run sees the same batches. The digit labels are not here: only the sums are."""

    def __init__(
        self,
        images: torch.Tensor,
        sums: torch.Tensor,
        batch_size: int,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.sums = images, sums
        self.batch_size, self.seed = batch_size, seed
        self.epoch_fn, self.augment = epoch_fn, augment
        self.rank, self.world_size = rank, world_size
        self._epochs_iterated = 0

    def _per_rank(self) -> int:
        return len(self.sums) // self.world_size

    def __len__(self) -> int:
        # The last, short batch is dropped only when there is more than one.
        per_rank = self._per_rank()
        return max(1, per_rank // self.batch_size)

    def __iter__(self) -> Iterator[TrainBatch]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._epochs_iterated
        self._epochs_iterated = epoch + 1
        seed = epoch_seed(self.seed, epoch)
        order = torch.randperm(len(self.sums), generator=torch.Generator().manual_seed(seed))
        per_rank = self._per_rank()
        order = order[self.rank * per_rank : (self.rank + 1) * per_rank].to(self.sums.device)
        device = self.images.device
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment is not None:
                flat = images.flatten(0, 1)
                generator = torch.Generator(device=device).manual_seed(augment_seed(seed, i, self.rank))
                images = self.augment(flat, generator).view_as(images)
            yield images, self.sums[idx]


class AdditionEvalBatches(StridedBatches):
    """Validation or test batches in storage order, of the tensors (images, sum digits, digit labels):
    every pass sees the same examples."""

    def __iter__(self) -> Iterator[EvalBatch]:
        return self.slices()


class MnistAdditionDataModule(TaskDataModule):
    """MNIST addition of two `digits`-digit numbers (see the module's docstring for the protocol).

    The other keys are `TaskDataModule`'s. `examples_per_step`: the examples (of 2N images) in a training
    batch; None: max(1, batch_size // (2 * digits)), so that a step costs about the same at every N.
    `eval_batch_size` counts images.
    """

    def __init__(self, *, digits: int = 1, examples_per_step: int | None = None, **shared: Any) -> None:
        check_addition_digits(digits)
        super().__init__(**shared)
        self.digits = digits
        if examples_per_step is not None:
            self.batch_size = examples_per_step
        else:
            self.batch_size = max(1, self.batch_size // (2 * digits))
        self.eval_batch_size = max(1, self.eval_batch_size // (2 * digits))
        # split -> (images [E, 2N, 1, 28, 28], digit labels [E, 2N], sum digits [E, N + 1])
        self._examples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        device = self._device()
        if stage in (None, "fit", "validate") and "train" not in self._examples:
            # An N that leaves no test example is told now, not after the training.
            check_addition_digits(self.digits, len(load_mnist(self.data_dir, train=False)[1]), "test images")
            images, labels = load_mnist(self.data_dir, train=True)
            # val_size=0 (experiment=addition_protocol): every training image trains, as in the papers.
            train_idx, val_idx = validation_split(len(labels), self.val_size, self.split_seed, minimum=0)
            images = normalize(images).unsqueeze(1)
            splits = [("train", train_idx, self.seed), ("val", val_idx, self.pair_seed + 1)]
            for split, idx, seed in splits[: 2 if self.val_size else 1]:
                check_addition_digits(self.digits, len(idx), f"{split} images")
                split_images, split_labels = images[idx].to(device), labels[idx].to(device)
                self._examples[split] = cut_examples(split_images, split_labels, self.digits, seed)
        if stage in (None, "test") and "test" not in self._examples:
            images, labels = load_mnist(self.data_dir, train=False)
            check_addition_digits(self.digits, len(labels), "test images")
            images = normalize(images).unsqueeze(1).to(device)
            self._examples["test"] = cut_examples(images, labels.to(device), self.digits, self.pair_seed)

    def num_examples(self, split: str) -> int:
        """How many examples `setup` cut from a split ("train", "val" or "test")."""
        return len(self._examples[split][2])

    def examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [E, 2N, 1, 28, 28], digit labels [E, 2N], sum digits [E, N + 1]) of a split."""
        return self._examples[split]

    def train_dataloader(self) -> AdditionTrainBatches:
        images, _, sums = self._examples["train"]  # the digit labels stay here
        rank, world_size = self._rank_and_world()
        return AdditionTrainBatches(
            images,
            sums,
            self.batch_size,
            seed=self.seed,
            epoch_fn=self._current_epoch if self.trainer is not None else None,
            augment=self.augment,
            rank=rank,
            world_size=world_size,
        )

    def _eval_batches(self, split: str) -> AdditionEvalBatches | list[EvalBatch]:
        if split == "val" and not self.val_size:
            return []  # experiment=addition_protocol: no validation split
        images, labels, sums = self._examples[split]
        rank, world_size = self._rank_and_world()
        return AdditionEvalBatches((images, sums, labels), self.eval_batch_size, rank, world_size)
