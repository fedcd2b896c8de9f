"""scripts/summary.py: the layer table and the receptive fields, checked against a hand computation."""

import hydra
import pytest

from mnist_adder.models import ConvBackbone, DigitSumNet, MLPAdder, SeedAdder, SeedBackbone
from mnist_adder.tools.summary import layer_table, receptive_fields, summary

from conftest import compose_config
from test_config import image_number_models

# The seed backbone by hand, from n=28, j=1, r=1 (no padding anywhere):
#   conv 3x3: n = 28-3+1 = 26, j = 1, r = 1+2*1 = 3
#   conv 3x3: n = 24, j = 1, r = 3+2 = 5
#   conv 3x3: n = 22, j = 1, r = 5+2 = 7
#   maxpool 2, stride 2: n = floor((22-2)/2)+1 = 11, j = 1*2 = 2, r = 7+1*1 = 8
#   conv 1x1: n = 11, j = 2, r = 8+0 = 8
#   conv 3x3: n = 9, j = 2, r = 8+2*2 = 12
#   conv 3x3: n = 7, j = 2, r = 16
#   conv 3x3: n = 5, j = 2, r = 20
#   conv 5x5: n = 5-5+1 = 1, j = 2, r = 20+4*2 = 28: the last layer sees the whole 28x28 image
SEED_BY_HAND = [  # (kind, kernel, stride, n_out, j_out, r_out)
    ("Conv2d", 3, 1, 26, 1, 3),
    ("Conv2d", 3, 1, 24, 1, 5),
    ("Conv2d", 3, 1, 22, 1, 7),
    ("MaxPool2d", 2, 2, 11, 2, 8),
    ("Conv2d", 1, 1, 11, 2, 8),
    ("Conv2d", 3, 1, 9, 2, 12),
    ("Conv2d", 3, 1, 7, 2, 16),
    ("Conv2d", 3, 1, 5, 2, 20),
    ("Conv2d", 5, 1, 1, 2, 28),
]
# Our backbone, (size, jump, field) with n_out = floor((n_in + 2p - k)/s) + 1, j_out = j_in*s,
# r_out = r_in + (k-1)*j_in:
#   conv 5x5 stride 2: floor((28-5)/2)+1 = 12, 2, 5     conv 3x3: 10, 2, 5+2*2 = 9
#   pool 2x2: 5, 4, 9+1*2 = 11                           conv 3x3: 3, 4, 11+2*4 = 19
SMALL_BY_HAND = [(12, 2, 5), (10, 2, 9), (5, 4, 11), (3, 4, 19)]


def test_seed_receptive_fields_match_the_hand_computation():
    fields = receptive_fields(layer_table(DigitSumNet(SeedBackbone(), SeedAdder())))
    assert [(f.kind, f.kernel, f.stride, f.size, f.jump, f.field) for f in fields] == SEED_BY_HAND
    assert fields[-1].field >= 28


def test_small_backbone_receptive_fields_match_the_hand_computation():
    fields = receptive_fields(layer_table(DigitSumNet(ConvBackbone(), MLPAdder())))
    assert [(f.size, f.jump, f.field) for f in fields] == SMALL_BY_HAND


@pytest.mark.parametrize("model", image_number_models())
def test_computed_sizes_match_the_real_forward_pass(make_cfg, model):
    layers = layer_table(hydra.utils.instantiate(make_cfg([f"model={model}"]).model).net)
    observed = {layer.name: layer.output_shape[-1] for layer in layers}
    for field in receptive_fields(layers):
        assert field.size == observed[field.name]


def test_seed_layer_table_has_the_seeds_shapes_and_parameters():
    layers = layer_table(DigitSumNet(SeedBackbone(), SeedAdder()))
    convs = [(layer.output_shape, layer.params) for layer in layers if layer.kind == "Conv2d"]
    assert convs == [
        ((10, 26, 26), 90),
        ((10, 24, 24), 900),
        ((15, 22, 22), 1_350),
        ((10, 11, 11), 150),
        ((10, 9, 9), 900),
        ((10, 7, 7), 900),
        ((10, 5, 5), 900),
        ((10, 1, 1), 2_500),
    ]
    assert sum(layer.params for layer in layers) == 21_843


def test_summary_prints_both_tables(capsys):
    summary(compose_config(["model=seed"], config_name="summary"))
    out = capsys.readouterr().out
    assert "Total params: 21,843" in out and "[-1, 10, 26, 26]" in out
    assert "receptive field is 28x28" in out and "covers the 28x28 image" in out


@pytest.mark.parametrize("adder", ["shift", "conv"])
def test_summary_counts_every_adder(capsys, adder):
    summary(compose_config([f"model/adder={adder}"], config_name="summary"))
    out = capsys.readouterr().out
    net = hydra.utils.instantiate(compose_config([f"model/adder={adder}"]).model.net)
    total = sum(p.numel() for p in net.parameters())
    assert f"Total params: {total:,}" in out
    # The exact shift has no parameters but is a layer of its own; the learned one is its kernel table.
    row = "adder (ShiftAdder)" if adder == "shift" else "adder.kernel (Linear)"
    params = 0 if adder == "shift" else 100
    assert any(line.startswith(row) and line.split()[-1] == f"{params:,}" for line in out.splitlines()), out
