"""WeightedMean: the per-stage metrics weigh batches by their size and samples by their weights."""

import torch

from mnist_adder.metrics import WeightedMean


def test_batches_count_by_their_size():
    metric = WeightedMean()
    metric.update(torch.tensor(1.0), 30)  # a batch of 30 with mean loss 1
    metric.update(torch.tensor(2.0), 10)  # a last, smaller batch with mean loss 2
    assert metric.compute() == (30 * 1.0 + 10 * 2.0) / 40


def test_per_sample_weights_select_the_samples():
    # sum_given_digit_acc: the sum's rightness, averaged over the samples whose digit is right.
    sum_right = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    digit_right = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    metric = WeightedMean()
    metric.update(sum_right, digit_right)
    assert metric.compute() == 1 / 3


def test_plain_mean_without_weights_and_reset():
    metric = WeightedMean()
    metric.update(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert metric.compute() == 0.75
    metric.reset()
    metric.update(torch.tensor([0.0, 1.0]))
    assert metric.compute() == 0.5
