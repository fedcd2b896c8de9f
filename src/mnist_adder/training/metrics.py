"""The torchmetrics of a run: one Metric per stage holding running sums of everything we report, the
held-out pair and coherence metrics, and the expected calibration error with its reliability bins.

A training step adds one small vector on the device; nothing is synced or read back until the epoch
ends, when `compute()` reduces across processes (DDP) and turns sums into means.
"""

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

ECE_BINS = 15

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


def calibration_error(num_classes: int, n_bins: int = ECE_BINS) -> MulticlassCalibrationError:
    """The ECE metric of one head: `n_bins` equal-width confidence bins, L1 (the ECE of Guo et al.)."""
    # validate_args=False: the argument checks would sync the device on every batch.
    return MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1", validate_args=False)


def reliability_bins(
    confidences: torch.Tensor | Sequence[torch.Tensor],
    accuracies: torch.Tensor | Sequence[torch.Tensor],
    n_bins: int = ECE_BINS,
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: the number of samples, their mean confidence and their accuracy
    (0 for an empty bin). A confidence of exactly 1 falls into the last bin."""
    confidences = dim_zero_cat(confidences).detach().float().cpu()
    right = dim_zero_cat(accuracies).detach().float().cpu()
    index = (confidences * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).index_add_(0, index, torch.ones_like(confidences))
    confidence_sum = torch.zeros(n_bins).index_add_(0, index, confidences)
    right_sum = torch.zeros(n_bins).index_add_(0, index, right)
    filled = count.clamp(min=1)
    return {
        "count": count.tolist(),
        "confidence": (confidence_sum / filled).tolist(),
        "accuracy": (right_sum / filled).tolist(),
    }


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """The ECE of one head from its logits [N, C] and the true classes [N], as the test metric computes it."""
    metric = calibration_error(logits.shape[-1], n_bins)
    metric.update(logits.float().softmax(dim=-1), labels)
    return float(metric.compute())
