import pytest
import torch

from mnist_adder.training.metrics import DigitSumMetrics


def test_metrics_accumulate_over_batches_and_reset():
    metrics = DigitSumMetrics()
    # batch 1: digits right, right, wrong, right; sums right, wrong, right, right
    metrics.update(
        torch.tensor(1.0),
        torch.tensor(0.4),
        torch.tensor(0.6),
        torch.tensor([True, True, False, True]),
        torch.tensor([True, False, True, True]),
    )
    # batch 2 (half the size, loss 3): digit right, sum wrong; digit wrong, sum wrong
    metrics.update(
        torch.tensor(3.0),
        torch.tensor(1.0),
        torch.tensor(2.0),
        torch.tensor([True, False]),
        torch.tensor([False, False]),
    )
    result = {k: v.item() for k, v in metrics.compute().items()}
    assert result["loss"] == pytest.approx((4 * 1.0 + 2 * 3.0) / 6)
    assert result["digit_loss"] == pytest.approx((4 * 0.4 + 2 * 1.0) / 6)
    assert result["digit_acc"] == pytest.approx(4 / 6)
    assert result["sum_acc"] == pytest.approx(3 / 6)
    assert result["both_acc"] == pytest.approx(2 / 6)
    assert result["sum_given_digit_acc"] == pytest.approx(2 / 4)
    metrics.reset()
    metrics.update(
        torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor([True]), torch.tensor([True])
    )
    assert metrics.compute()["both_acc"].item() == 1.0
