"""(digit, number) pairs held out of training and validation, to test whether the adder adds.

`data.heldout_pairs` is null (nothing held out), a list of [digit, number] pairs, or the name of a
preset. The test set keeps its fixed pairs, so its samples whose pair is held out were never seen in
training: the sum accuracy on them (`test/sum_acc_unseen_pairs`) against the rest
(`test/sum_acc_seen_pairs`) says whether the adder learned to add or memorised the pairs.

This module sits beside config_checks (which checks the values) rather than in data/, because the data
package imports config_checks.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:
    import torch

NUM_DIGITS = 10

# One pair for each of the 19 sums 0..18 (digit + number), so every sum has a pair the adder never saw.
# Chosen so that no digit and no number is held out more than twice: every digit keeps at least 8 of
# its 10 numbers. Sums 0 and 18 have a single pair each, (0,0) and (9,9), so with this preset the sum
# head never sees those two classes in training.
ONE_PER_SUM = (
    (0, 0), (1, 0), (0, 2), (1, 2), (3, 1), (4, 1), (2, 4), (2, 5), (3, 5), (5, 4),
    (4, 6), (5, 6), (9, 3), (6, 7), (7, 7), (7, 8), (8, 8), (8, 9), (9, 9),
)  # fmt: skip
HELDOUT_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {"one_per_sum": ONE_PER_SUM}


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
