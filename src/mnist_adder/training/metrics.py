"""One torchmetrics Metric per stage holding running sums of everything we report.

A training step adds one small vector on the device; nothing is synced or read back until the epoch
ends, when `compute()` reduces across processes (DDP) and turns sums into means.
"""

import torch
from torchmetrics import Metric

NAMES = ("loss", "digit_loss", "sum_loss", "digit_acc", "sum_acc", "both_acc", "sum_given_digit_acc")


class DigitSumMetrics(Metric):
    """Mean losses, digit/sum/both accuracy, and sum accuracy among samples whose digit is right."""

    full_state_update = False
    # totals: loss*n, digit_loss*n, sum_loss*n, digit right, sum right, both right, n
    totals: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("totals", default=torch.zeros(7), dist_reduce_fx="sum")

    def update(
        self,
        loss: torch.Tensor,
        digit_loss: torch.Tensor,
        sum_loss: torch.Tensor,
        digit_right: torch.Tensor,
        sum_right: torch.Tensor,
    ) -> None:
        # torch.full launches a fill; torch.tensor(n, device=cuda) would copy and sync the stream.
        n = torch.full((1,), float(digit_right.numel()), device=digit_right.device)
        losses = torch.stack([loss, digit_loss, sum_loss]).detach().float() * n
        counts = torch.stack([digit_right, sum_right, digit_right & sum_right]).sum(dim=1).float()
        self.totals += torch.cat([losses, counts, n])

    def compute(self) -> dict[str, torch.Tensor]:
        loss, digit_loss, sum_loss, digit_right, sum_right, both_right, n = self.totals
        return {
            "loss": loss / n,
            "digit_loss": digit_loss / n,
            "sum_loss": sum_loss / n,
            "digit_acc": digit_right / n,
            "sum_acc": sum_right / n,
            "both_acc": both_right / n,
            # Sum right among digit right: both right / digit right.
            "sum_given_digit_acc": both_right / digit_right.clamp(min=1),
        }


class HeldoutPairSumAccuracy(Metric):
    """Sum accuracy apart on samples whose (digit, number) pair was seen in training and on those whose
    pair was held out (`data.heldout_pairs`): does the adder add, or did it memorise the pairs? And on
    samples whose sum never occurred in training (all its pairs held out): can it give a sum it was
    never shown?"""

    full_state_update = False
    # totals: sum right on seen pairs, samples with seen pairs, sum right on unseen pairs, samples with
    # unseen pairs, sum right on unseen sums, samples with unseen sums
    totals: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("totals", default=torch.zeros(6), dist_reduce_fx="sum")

    def update(self, sum_right: torch.Tensor, unseen_pair: torch.Tensor, unseen_sum: torch.Tensor) -> None:
        seen_pair = ~unseen_pair
        counts = [(sum_right & seen_pair).sum(), seen_pair.sum(), (sum_right & unseen_pair).sum()]
        counts += [unseen_pair.sum(), (sum_right & unseen_sum).sum(), unseen_sum.sum()]
        self.totals += torch.stack(counts).float()

    def compute(self) -> dict[str, torch.Tensor]:
        # A group without samples (a test cut to a few batches) gives NaN (0/0), not a made-up 0.
        seen_right, seen, unseen_right, unseen, unseen_sum_right, unseen_sums = self.totals
        return {
            "sum_acc_seen_pairs": seen_right / seen,
            "sum_acc_unseen_pairs": unseen_right / unseen,
            "sum_acc_unseen_sums": unseen_sum_right / unseen_sums,
        }


class SumCoherenceGap(Metric):
    """Mean over samples of |P(sum = s) - P(digit = s - n)| at the predicted sum s, from the probabilities
    the network outputs (P(digit = k) = 0 for k outside 0..9).

    The sum is the digit plus a known n, so a coherent network is exactly as sure of the sum s as of the
    digit s - n. The exact shift adder is coherent by construction (0 up to float error while both
    temperatures are 1); an MLP adder can be far more certain of a sum than of the digit it comes from.
    """

    full_state_update = False
    # totals: sum of the gaps, samples
    totals: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("totals", default=torch.zeros(2), dist_reduce_fx="sum")

    def update(self, digit_probs: torch.Tensor, sum_probs: torch.Tensor, number: torch.Tensor) -> None:
        """[B, 10] and [B, 19] probabilities (rows sum to 1) and [B] numbers 0..9."""
        sum_prob, predicted = sum_probs.max(dim=-1)
        digit = predicted - number
        has_digit = (digit >= 0) & (digit < digit_probs.shape[-1])
        digit_prob = digit_probs.gather(-1, digit.clamp(0, digit_probs.shape[-1] - 1)[:, None]).squeeze(-1)
        gaps = (sum_prob - digit_prob * has_digit).abs()
        n = torch.full((1,), float(gaps.numel()), device=gaps.device)
        self.totals += torch.cat([gaps.sum().float()[None], n])

    def compute(self) -> torch.Tensor:
        gap_total, n = self.totals
        return gap_total / n
