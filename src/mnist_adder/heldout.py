"""(digit, number) pairs held out of training and validation, to test whether the adder adds.

`data.heldout_pairs` is null (nothing held out), a list of [digit, number] pairs, or the name of a
preset. The test set keeps its fixed pairs, so its samples whose pair is held out were never seen in
training: the sum accuracy on them (`test/sum_acc_unseen_pairs`) against the rest
(`test/sum_acc_seen_pairs`) says whether the adder learned to add or memorised the pairs. A sum all of
whose pairs are held out never appears in training either (`heldout_sums`): the sum accuracy on the test
samples with such a sum is `test/sum_acc_unseen_sums`.

This module sits beside config_checks (which checks the values) rather than in data/, because the data
package imports config_checks.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS

if TYPE_CHECKING:
    import torch


# One pair for each of the 19 sums 0..18 (digit + number), so every sum has a pair the adder never saw.
# Chosen so that no digit and no number is held out more than twice: every digit keeps at least 8 of
# its 10 numbers. Sums 0 and 18 have a single pair each, (0,0) and (9,9), so with this preset the sum
# head never sees those two classes in training.
ONE_PER_SUM = (
    (0, 0), (1, 0), (0, 2), (1, 2), (3, 1), (4, 1), (2, 4), (2, 5), (3, 5), (5, 4),
    (4, 6), (5, 6), (9, 3), (6, 7), (7, 7), (7, 8), (8, 8), (8, 9), (9, 9),
)  # fmt: skip
# Every pair with digit + number >= 15 (10 pairs): the sums 15..18 never appear in training or
# validation, so the sum head must produce classes it was never shown. Every digit and number keeps
# at least 6 partners (digit 9 keeps the numbers 0..5).
HIGH_SUMS = tuple((d, n) for d in range(NUM_DIGITS) for n in range(NUM_DIGITS) if d + n >= 15)
# 25 pairs drawn at random, such that every digit and every number keeps at least 5 of its 10 partners;
# no whole sum is held out. Drawn with random.Random(25) by tests/test_heldout_pairs.py
# (`draw_random_pairs`), which checks that this list is that draw.
RANDOM25 = (
    (0, 5), (0, 8), (0, 9), (1, 2), (1, 3), (1, 6), (2, 0), (2, 4), (4, 5), (5, 1), (5, 3), (5, 8), (6, 0),
    (6, 5), (6, 7), (6, 9), (7, 2), (7, 4), (7, 6), (7, 9), (8, 1), (8, 3), (8, 6), (9, 1), (9, 5),
)  # fmt: skip
HELDOUT_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "one_per_sum": ONE_PER_SUM,
    "high_sums": HIGH_SUMS,
    "random25": RANDOM25,
}


def heldout_pair_list(value: str | Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """The pairs `value` names (a preset's, or the list itself); [] for None. `value` is assumed checked."""
    if value is None:
        return []
    if isinstance(value, str):
        return list(HELDOUT_PRESETS[value])
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return [(int(digit), int(number)) for digit, number in value]


def heldout_table(value: Any) -> "torch.Tensor | None":
    """A (10, 10) bool table, True at [digit, number] when the pair is held out; None when none is."""
    pairs = heldout_pair_list(value)
    if not pairs:
        return None
    import torch

    table = torch.zeros(NUM_DIGITS, NUM_DIGITS, dtype=torch.bool)
    digits, numbers = zip(*pairs, strict=True)
    table[list(digits), list(numbers)] = True
    return table


def heldout_sums(table: "torch.Tensor") -> "torch.Tensor":
    """[19] bool, True for a sum all of whose (digit, number) pairs are held out in the (10, 10) `table`:
    a sum that never occurs in training or validation."""
    import torch

    sums = torch.arange(NUM_DIGITS)[:, None] + torch.arange(NUM_DIGITS)[None, :]
    seen = torch.zeros(NUM_SUMS, dtype=torch.bool)
    seen[sums[~table.cpu()]] = True
    return (~seen).to(table.device)
