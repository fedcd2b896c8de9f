import hydra
import pytest
import torch
from torch import nn

from mnist_adder.models import ConvBackbone, DigitSumNet, MLPAdder, SeedAdder, SeedBackbone

from conftest import compose_config


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_seed_network_has_the_seeds_parameter_counts():
    assert n_params(SeedBackbone()) == 7_840
    assert n_params(SeedAdder()) == 14_003
    assert n_params(DigitSumNet(SeedBackbone(), SeedAdder())) == 21_843


def test_seed_backbone_layer_table():
    """Output shape and parameters of every conv, as in ../shared/seed/architecture.md."""
    expected = [  # (out C, H, W), conv params
        ((10, 26, 26), 90),
        ((10, 24, 24), 900),
        ((15, 22, 22), 1_350),  # the table's 15x11x11 is after the MaxPool that follows
        ((10, 11, 11), 150),
        ((10, 9, 9), 900),
        ((10, 7, 7), 900),
        ((10, 5, 5), 900),
        ((10, 1, 1), 2_500),
    ]
    backbone = SeedBackbone().eval()
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    shapes = []
    hooks = [c.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for c in convs]
    with torch.no_grad():
        out = backbone(torch.zeros(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert [(s, n_params(c)) for s, c in zip(shapes, convs, strict=True)] == expected
    assert all(c.bias is None for c in convs)
    pools = [m for m in backbone.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1 and out.shape == (2, 10)
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [10, 10, 15, 10, 10, 10, 10]
    assert sum(isinstance(m, nn.Dropout) for m in backbone.modules()) == 6  # all but conv 3 and conv 8


def test_seed_adder_layer_table():
    linears = [m for m in SeedAdder().modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 32), (32, 64), (64, 128), (128, 19)]
    assert [n_params(m) for m in linears] == [672, 2_112, 8_320, 2_451]


@pytest.mark.parametrize("adder_input", ["logits", "softmax", "detached"])
def test_digit_sum_net_shapes(adder_input):
    net = DigitSumNet(ConvBackbone(), MLPAdder(), adder_input=adder_input)
    digit_logits, sum_logits = net(torch.randn(4, 1, 28, 28), torch.eye(10)[:4])
    assert digit_logits.shape == (4, 10) and sum_logits.shape == (4, 19)


def test_detached_adder_input_keeps_sum_loss_off_the_backbone():
    for adder_input, reaches_backbone in [("softmax", True), ("detached", False)]:
        net = DigitSumNet(ConvBackbone(), MLPAdder(), adder_input=adder_input)
        _, sum_logits = net(torch.randn(4, 1, 28, 28), torch.eye(10)[:4])
        sum_logits.sum().backward()
        grad = net.backbone.head[-1].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches_backbone


def test_unknown_adder_input_is_refused():
    with pytest.raises(ValueError, match="adder_input"):
        DigitSumNet(ConvBackbone(), MLPAdder(), adder_input="probs")


def test_stem_keeps_full_resolution_first_and_the_configured_models_fit_their_budget():
    stem = ConvBackbone(stem_channels=8)
    first = stem.features[0](torch.randn(2, 1, 28, 28))
    assert first.shape == (2, 8, 26, 26)  # a 3x3 at full resolution, before any stride
    assert stem.features[1](first).shape[-2:] == (12, 12)  # then the strided layer, as without a stem
    assert stem(torch.randn(2, 1, 28, 28)).shape == (2, 10)

    small = hydra.utils.instantiate(compose_config().model).net
    assert n_params(small) <= 25_000  # the budget for the default model
    assert small.backbone.features[0][0].kernel_size == (3, 3)  # the default has the stem


def test_test_shifts_average_five_views_out_of_training_and_leave_training_alone():
    torch.manual_seed(0)
    plain = DigitSumNet(ConvBackbone(), MLPAdder(), "softmax")
    shifted = DigitSumNet(ConvBackbone(), MLPAdder(), "softmax", test_shifts=True)
    shifted.load_state_dict(plain.state_dict())
    image, number_onehot = torch.randn(6, 1, 28, 28), torch.eye(10)[:6]
    # Training: the one backbone pass, as without test_shifts (dropout off to compare the two).
    for net in (plain, shifted):
        net.train()
        net.backbone.head[1].p = 0.0
    for got, want in zip(shifted(image, number_onehot), plain(image, number_onehot), strict=True):
        assert torch.equal(got, want)
    # Out of training: the mean log-probabilities of the image and its four one-pixel shifts, which the
    # adder reads (as their softmax, this net's adder input).
    shifted.eval()
    with torch.inference_mode():
        shifts = ((1, 0), (-1, 0), (0, 1), (0, -1))
        views = [image] + [torch.roll(image, shift, dims=(2, 3)) for shift in shifts]
        expected = torch.stack([shifted.backbone(v).log_softmax(-1) for v in views]).mean(0)
        digit_logits, sum_logits = shifted(image, number_onehot)
        assert torch.allclose(digit_logits, expected, atol=1e-6)
        assert torch.allclose(
            sum_logits, shifted.adder(torch.cat([expected.softmax(-1), number_onehot], -1)), atol=1e-5
        )
        # Each image's answer is its own: alone or in a batch, the same.
        alone = shifted(image[3:4], number_onehot[3:4])[0]
        assert torch.allclose(alone, digit_logits[3:4], atol=1e-5)
        assert not torch.allclose(digit_logits, plain.eval()(image, number_onehot)[0], atol=1e-3)
        # shifts=False (validation, part of training) reads the plain net.
        unshifted = shifted(image, number_onehot, shifts=False)
        for got, want in zip(unshifted, plain(image, number_onehot), strict=True):
            assert torch.equal(got, want)


def test_the_fast_preset_tests_with_shifts_and_validates_without(monkeypatch):
    module = hydra.utils.instantiate(compose_config(["experiment=fast"]).model).eval()
    assert module.net.test_shifts
    reads = []
    original = module.net.shift_averaged_logits
    monkeypatch.setattr(module.net, "shift_averaged_logits", lambda image: reads.append(1) or original(image))
    labels = torch.arange(4)
    numbers = torch.eye(10)[:4]
    batch = (torch.randn(4, 1, 28, 28), numbers, labels, torch.eye(19)[labels + torch.arange(4)])
    module._step(batch, "val")
    assert reads == []  # validation is part of training: the plain net
    module._step(batch, "test")
    assert reads == [1]
