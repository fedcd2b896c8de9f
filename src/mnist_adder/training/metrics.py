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
    pair was held out (`data.heldout_pairs`): does the adder add, or did it memorise the pairs?"""

    full_state_update = False
    # totals: sum right on seen pairs, samples with seen pairs, sum right on unseen pairs, samples with unseen
    totals: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("totals", default=torch.zeros(4), dist_reduce_fx="sum")

    def update(self, sum_right: torch.Tensor, unseen_pair: torch.Tensor) -> None:
        seen_pair = ~unseen_pair
        counts = [(sum_right & seen_pair).sum(), seen_pair.sum(), (sum_right & unseen_pair).sum()]
        self.totals += torch.stack([*counts, unseen_pair.sum()]).float()

    def compute(self) -> dict[str, torch.Tensor]:
        # A group without samples (a test cut to a few batches) gives NaN (0/0), not a made-up 0.
        seen_right, seen, unseen_right, unseen = self.totals
        return {"sum_acc_seen_pairs": seen_right / seen, "sum_acc_unseen_pairs": unseen_right / unseen}
