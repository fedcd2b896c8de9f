"""The stage metrics are per-sample means however the batches fall (uneven last batches, DDP shards)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from mnist_adder.data.batches import make_batch
from mnist_adder.models import ConvBackbone, DigitSumNet, MLPAdder
from mnist_adder.training.module import DigitSumModule


def test_losses_are_means_over_samples_not_batches():
    torch.manual_seed(0)
    module = DigitSumModule(DigitSumNet(ConvBackbone(), MLPAdder()), optimizer=torch.optim.SGD).eval()
    images, labels, numbers = torch.randn(7, 1, 28, 28), torch.arange(7) % 10, torch.arange(7) % 3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer only warns
        for part in (slice(0, 5), slice(5, 7)):  # batches of 5 and 2
            module._step(make_batch(images[part], labels[part], numbers[part]), "test")
        digit_logits, sum_logits = module(images, F.one_hot(numbers, 10).float())
    per_sample = F.cross_entropy(digit_logits, labels, reduction="none") + F.cross_entropy(
        sum_logits, labels + numbers, reduction="none"
    )
    loss = module.stage_metrics["test_metrics"].compute()["loss"]
    assert float(loss) == pytest.approx(float(per_sample.mean()), abs=1e-5)


def test_label_smoothing_softens_the_training_loss_only():
    torch.manual_seed(0)
    net = DigitSumNet(ConvBackbone(), MLPAdder()).eval()
    plain = DigitSumModule(net, optimizer=torch.optim.SGD)
    smoothed = DigitSumModule(net, optimizer=torch.optim.SGD, label_smoothing=0.1)
    batch = make_batch(torch.randn(6, 1, 28, 28), torch.arange(6), torch.arange(6) % 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer only warns
        losses = {
            (name, stage): float(module._step(batch, stage)[0])
            for name, module in (("plain", plain), ("smoothed", smoothed))
            for stage in ("train", "val")
        }
        digit_logits, sum_logits = net(batch[0], batch[1])
    expected = F.cross_entropy(digit_logits, batch[2], label_smoothing=0.1) + F.cross_entropy(
        sum_logits, batch[3].argmax(dim=-1), label_smoothing=0.1
    )
    assert losses["smoothed", "train"] == pytest.approx(float(expected), rel=1e-5)
    assert losses["smoothed", "train"] != pytest.approx(losses["plain", "train"])
    assert losses["smoothed", "val"] == losses["plain", "val"]  # comparable across recipes
