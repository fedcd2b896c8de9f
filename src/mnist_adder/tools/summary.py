"""A model's layer table and its conv backbone's receptive fields, behind scripts/summary.py.

The layer table comes from forward hooks on a real forward pass (output shape and parameters of every
layer, as the seed printed it). The receptive field follows the standard recurrence over the conv and
pooling layers, in the order the forward pass ran them, starting from the 28x28 input (n=28, j=1, r=1):

    n_out = floor((n_in + 2p - k) / s) + 1      output size
    j_out = j_in * s                           jump: input pixels between neighbouring outputs
    r_out = r_in + (k - 1) * j_in              receptive field: input pixels one output sees
    start_out = start_in + ((k - 1) / 2 - p) * j_in   centre of the first output's field

with k the effective kernel size (dilation d: d * (k - 1) + 1).
"""

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from mnist_adder.cli import build
from mnist_adder.config_checks import check_config

IMAGE_SIZE = 28
SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class Layer:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    module: nn.Module


@dataclass
class Field:
    name: str
    kind: str
    kernel: int
    stride: int
    padding: int
    size: int  # n: output size
    jump: int  # j
    field: int  # r: receptive field
    start: float  # centre of the first output's field, in input pixels


def _leaf_layers(net: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in net.named_modules() if not list(m.children())}


def layer_table(net: nn.Module, batch: int = 2) -> list[Layer]:
    """Every leaf layer in the order the forward pass runs it, with its output shape and parameters."""
    names = _leaf_layers(net)
    rows: list[Layer] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(Layer(names[module], type(module).__name__, tuple(output.shape[1:]), params, module))

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(*net.example_inputs(batch))  # each task's net knows its inputs' shapes
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return rows


def _single(value: int | tuple[int, ...]) -> int:
    # Square kernels, strides and paddings throughout this project; a tuple's first entry stands for all.
    return value[0] if isinstance(value, tuple) else value


def receptive_fields(layers: list[Layer], prefix: str = "backbone.") -> list[Field]:
    """The recurrence over the conv and pooling layers of the backbone (layers named under `prefix`)."""
    size, jump, field, start = IMAGE_SIZE, 1, 1, 0.5
    rows = []
    for layer in layers:
        module = layer.module
        if not layer.name.startswith(prefix) or not isinstance(module, SPATIAL):
            continue
        kernel, stride, padding = (
            _single(module.kernel_size),
            _single(module.stride),
            _single(module.padding),
        )
        dilation = _single(getattr(module, "dilation", 1))
        kernel = dilation * (kernel - 1) + 1
        rounding = math.ceil if getattr(module, "ceil_mode", False) else math.floor
        size = rounding((size + 2 * padding - kernel) / stride) + 1
        start = start + ((kernel - 1) / 2 - padding) * jump
        field = field + (kernel - 1) * jump
        jump = jump * stride
        rows.append(Field(layer.name, layer.kind, kernel, stride, padding, size, jump, field, start))
    return rows


def format_layer_table(layers: list[Layer], net: nn.Module) -> str:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    width = 78
    lines = [
        f"{'Layer (type)':<44}{'Output Shape':>20}{'Param #':>14}",
        "=" * width,
    ]
    for layer in layers:
        shape = str([-1, *layer.output_shape])
        lines.append(f"{f'{layer.name} ({layer.kind})':<44}{shape:>20}{layer.params:>14,}")
    lines += [
        "=" * width,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        "-" * width,
    ]
    return "\n".join(lines)


def format_receptive_fields(fields: list[Field]) -> str:
    if not fields:
        return "The backbone has no conv or pooling layers: no receptive field to compute."
    lines = [
        f"Receptive field of the backbone (input {IMAGE_SIZE}x{IMAGE_SIZE}: n=28, j=1, r=1)",
        f"{'layer':<34}{'k':>4}{'s':>4}{'p':>4}{'n_out':>8}{'j_out':>8}{'r_out':>8}{'start':>8}",
        "-" * 78,
    ]
    for f in fields:
        lines.append(
            f"{f'{f.name} ({f.kind})':<34}{f.kernel:>4}{f.stride:>4}{f.padding:>4}"
            f"{f.size:>8}{f.jump:>8}{f.field:>8}{f.start:>8.1f}"
        )
    last = fields[-1]
    lo, hi = last.start - last.field / 2, last.start + (last.size - 1) * last.jump + last.field / 2
    covers = "covers" if last.field >= IMAGE_SIZE else "does not cover"
    # lo and hi are pixel edges: pixel i spans [i, i + 1).
    first, last_pixel = max(math.floor(lo), 0), min(math.ceil(hi), IMAGE_SIZE) - 1
    together = (
        "the whole image"
        if lo <= 0 and hi >= IMAGE_SIZE
        else f"input pixels {first}..{last_pixel} of 0..{IMAGE_SIZE - 1}"
    )
    lines += [
        "-" * 78,
        f"The last layer's receptive field is {last.field}x{last.field}: one output alone {covers} the "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} image;",
        f"its {last.size}x{last.size} outputs together see {together}.",
    ]
    return "\n".join(lines)


def summary(cfg: DictConfig) -> str:
    """Print the layer table of `cfg.model` and its backbone's receptive fields; return the text."""
    check_config(cfg)
    net = build(cfg.model, "model").net
    layers = layer_table(net)
    text = "\n\n".join([format_layer_table(layers, net), format_receptive_fields(receptive_fields(layers))])
    print(text)
    return text
