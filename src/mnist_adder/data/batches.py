"""Batches cut from tensors held in memory: no Dataset, no workers, no per-sample Python.

MNIST is 47 MB as uint8: keeping it as one normalised tensor (on the accelerator when there is one)
and slicing batches out of it costs a gather per step, which is far cheaper than a DataLoader.
"""

from collections.abc import Callable, Iterator, Sequence

import torch

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_batch(images: torch.Tensor, labels: torch.Tensor, numbers: torch.Tensor) -> Batch:
    """(image, number_onehot, label, sum_onehot) from images, digit labels and numbers 0..9."""
    return images, one_hot(numbers, NUM_DIGITS), labels, one_hot(labels + numbers, NUM_SUMS)


def one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows [N, num_classes] of class indices [N]: F.one_hot(...).float()'s values.

    One fill and one scatter on the indices' device. F.one_hot reads the indices' minimum back to the
    host on every device but CUDA (a `.item()` per call: two per training batch), so a CPU profile of a
    step could not show whether a step reads nothing back (tests/test_host_reads.py)."""
    rows = torch.zeros(classes.shape[0], num_classes, device=classes.device)
    return rows.scatter_(1, classes.unsqueeze(1), 1.0)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order (and numbers) from the run's seed: every epoch its own draw."""
    return seed * 1_000_003 + epoch


def augment_seed(epoch_seed: int, batch: int, rank: int) -> int:
    """The seed of one training batch's augmentation, per (seed, epoch, batch, rank): any batch can be
    reproduced on its own."""
    return (epoch_seed * 100_003 + batch) * 64 + rank


def draw_numbers(
    count: int, seed: int, labels: torch.Tensor | None = None, heldout: torch.Tensor | None = None
) -> torch.Tensor:
    """`count` numbers, reproducible from `seed` on any device: uniform over all of 0..9, or, given the
    digit `labels` (CPU) and a (10, 10) `heldout` table of [digit, number] pairs, uniform over the
    numbers whose pair with the sample's digit is not held out."""
    generator = torch.Generator().manual_seed(seed)
    numbers = torch.randint(0, NUM_DIGITS, (count,), generator=generator)
    if heldout is None:
        return numbers
    # Only the held-out draws change, from draws made after the first ones: with heldout=None the
    # numbers are exactly those of before, and the allowed pairs of a digit stay equally likely
    # (1/10 + (k/10) / (10 - k) = 1 / (10 - k) each, k of its numbers held out).
    allowed = ~heldout
    allowed_count = allowed.sum(dim=1)
    # Row d: digit d's allowed numbers first, in order (a stable sort puts the False of ~allowed first).
    allowed_numbers = torch.sort((~allowed).to(torch.uint8), dim=1, stable=True).indices
    uniform = torch.rand(count, generator=generator, dtype=torch.float64)
    counts = allowed_count[labels]
    pick = torch.minimum((uniform * counts).long(), counts - 1)
    return torch.where(heldout[labels, numbers], allowed_numbers[labels, pick], numbers)


class TrainBatches:
    """Shuffled training batches whose numbers are drawn afresh every epoch (or once, if not resampled),
    never forming a held-out (digit, number) pair when `heldout` is given.

    The order and the numbers of epoch e come from (seed, e) alone, so a resumed run sees exactly the
    batches it would have seen, and every DDP rank shares one permutation and takes its own slice.

    Resuming mid-epoch: `state_dict()` is (epoch, batches already trained in it), an epoch trained to
    its end counting as (next epoch, 0); after `load_state_dict`, the next pass is that epoch, without
    the batches already done. `progress_fn` says (batches trained in this pass, pass finished) as the
    trainer counts them (Lightning fetches one batch ahead, so one more batch has been handed out
    than trained); without it, the batches handed out count.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        resample_numbers: bool = True,
        epoch_fn: Callable[[], int] | None = None,
        progress_fn: Callable[[], tuple[int, bool]] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        heldout: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        # (10, 10) bool, [digit, number] never to be drawn; the numbers are drawn on the CPU from the labels.
        self.heldout = heldout
        self._cpu_labels = labels.cpu() if heldout is not None else None
        self.augment = augment
        self.batch_size, self.seed = batch_size, seed
        self.resample_numbers = resample_numbers
        self.epoch_fn, self.progress_fn = epoch_fn, progress_fn
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self._epochs_iterated = 0
        self._epoch, self._handed_out = 0, 0
        self._resume_at: tuple[int, int] | None = None

    def _per_rank(self) -> int:
        return len(self.labels) // self.world_size

    def __len__(self) -> int:
        per_rank = self._per_rank()
        if self.drop_last and per_rank >= self.batch_size:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def _epoch_seed(self, epoch: int) -> int:
        return epoch_seed(self.seed, epoch)

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices of this rank in order, numbers paired with all samples) for an epoch."""
        generator = torch.Generator().manual_seed(self._epoch_seed(epoch))
        order = torch.randperm(len(self.labels), generator=generator)
        number_seed = self._epoch_seed(epoch if self.resample_numbers else 0) + 500_009
        numbers = draw_numbers(len(self.labels), number_seed, self._cpu_labels, self.heldout)
        per_rank = self._per_rank()
        order = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order, numbers

    def state_dict(self) -> dict[str, int]:
        if self.progress_fn is not None:
            done, finished = self.progress_fn()
        else:
            done, finished = self._handed_out, self._handed_out >= len(self)
        # The epoch is the one this object last iterated: the trainer's counter may already have moved on.
        if finished:
            return {"epoch": self._epoch + 1, "batches_done": 0}
        return {"epoch": self._epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches_done"]))

    def __iter__(self) -> Iterator[Batch]:
        if self._resume_at is not None:
            # The epoch comes from the checkpoint: Lightning may start this pass before it has
            # restored its own epoch counter.
            epoch, start = self._resume_at
            self._resume_at = None
        else:
            epoch = self.epoch_fn() if self.epoch_fn is not None else self._epochs_iterated
            start = 0
        self._epochs_iterated = epoch + 1
        self._epoch, self._handed_out = epoch, start
        order, numbers = self.epoch_order(epoch)
        device = self.images.device
        order, numbers = order.to(device), numbers.to(device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment is not None:
                seed = augment_seed(self._epoch_seed(epoch), i, self.rank)
                images = self.augment(images, torch.Generator(device=device).manual_seed(seed))
            self._handed_out = i + 1
            yield make_batch(images, self.labels[idx], numbers[idx])


class StridedBatches:
    """Batches in storage order of `tensors` that share their first dimension, this rank's strided shard
    of them: every pass sees the same samples. Validation and test batches of both tasks."""

    def __init__(
        self, tensors: Sequence[torch.Tensor], batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        # Strided shards keep every sample exactly once across ranks without padding duplicates.
        self.shards = tuple(tensor[rank::world_size] for tensor in tensors)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.shards[0]) // self.batch_size)

    def slices(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each batch's slice of every tensor, in the order of `tensors`."""
        for start in range(0, len(self.shards[0]), self.batch_size):
            yield tuple(shard[start : start + self.batch_size] for shard in self.shards)


class EvalBatches(StridedBatches):
    """Batches in storage order with numbers fixed at construction: every pass sees the same pairs."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        numbers: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__((images, labels, numbers.to(images.device)), batch_size, rank, world_size)
        # This rank's share, by name (eval counts the test images by its labels).
        self.images, self.labels, self.numbers = self.shards

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, numbers in self.slices():
            yield make_batch(images, labels, numbers)
