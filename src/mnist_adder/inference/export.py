"""Writing a trained model for use outside this project, behind scripts/export.py: ONNX and TorchScript.

Both take what the network takes, an already normalised image (see `mnist_adder.data.normalize`; MNIST
mean and std are also stored in the ONNX metadata) and the number as a one-hot vector:
inputs image float32 [N, 1, 28, 28] and number_onehot float32 [N, 10]; outputs digit_logits [N, 10] and
sum_logits [N, 19], then not_digit_score float64 [N] and not_digit bool [N] (score above the threshold
stored in the checkpoint: not a handwritten digit; a checkpoint without a detector gives NaN and false);
N is free.

An MNIST-addition checkpoint (data=mnist_addition) exports its backbone, `ExportedBackbone`: input image
float32 [N, 1, 28, 28], output digit_logits [N, 10]. The sum of two numbers is computed from the digits'
softmax outside the network, as in `models/number_sum.py` (its docstring and docs/mnist_addition.md give
the carry chain): the field's prediction is the sum of the most probable digits.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from mnist_adder.data.mnist import MNIST_MEAN, MNIST_STD
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint
from mnist_adder.models.digit_sum import DigitSumNet

INPUT_NAMES = ("image", "number_onehot")
# The two heads first, as they always were; "not a digit" after them.
OUTPUT_NAMES = ("digit_logits", "sum_logits", "not_digit_score", "not_digit")
INSTALL_HINT = 'ONNX export needs the export extra: pip install -e ".[export]"'


class ExportedNet(nn.Module):
    """The net with its "not a digit" outputs: (digit_logits, sum_logits, not_digit_score, not_digit)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, image: torch.Tensor, number_onehot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        digit_logits, sum_logits, score = self.net.forward_with_not_digit(image, number_onehot)
        # NaN (no detector) compares false: nothing is refused.
        return digit_logits, sum_logits, score, score > self.net.not_digit.threshold


class ExportedBackbone(nn.Module):
    """An MNIST-addition net's digit reader: image [N, 1, 28, 28] -> digit_logits [N, 10]."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)


# What each task's checkpoint exports, by `TaskModule.task`.
EXPORTED: dict[str, Callable[[nn.Module], nn.Module]] = {
    "digit_sum": ExportedNet,
    "mnist_addition": lambda net: ExportedBackbone(net.backbone),
}
ADDITION_PROPS = {
    "image_normalisation": f"(pixels / 255 - {MNIST_MEAN}) / {MNIST_STD}",
    "inputs": "image float32 [N,1,28,28] (MNIST-like: light digit on black), one digit of a number each",
    "outputs": "digit_logits [N,10] (digit 0..9)",
    "sum": (
        "MNIST addition: softmax each digit's logits; the field's prediction is the sum of the most "
        "probable digits; the exact distribution of the sum is the carry chain of models/number_sum.py"
    ),
}


def _inputs_of(net: nn.Module) -> tuple[torch.Tensor, ...]:
    image, number_onehot = DigitSumNet.example_inputs()
    return (image,) if isinstance(net, ExportedBackbone) else (image, number_onehot)


def _digit_sum_props(net: nn.Module) -> dict[str, str]:
    detector = net.net.not_digit if isinstance(net, ExportedNet) else None
    threshold = float(detector.threshold) if detector is not None and detector.fitted else None
    return {
        "not_digit_threshold": "none (no detector)" if threshold is None else repr(threshold),
        "image_normalisation": f"(pixels / 255 - {MNIST_MEAN}) / {MNIST_STD}",
        "inputs": "image float32 [N,1,28,28] (MNIST-like: light digit on black); number_onehot [N,10]",
        "outputs": (
            "digit_logits [N,10] (digit 0..9); sum_logits [N,19] (digit + number, 0..18); "
            "not_digit_score float64 [N] (higher: less like a handwritten digit; NaN: no detector); "
            "not_digit bool [N] (score above the stored threshold)"
        ),
    }


def export_onnx(net: torch.nn.Module, path: Path) -> Path:
    """The network as an ONNX model with named inputs and outputs and a dynamic batch dimension."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it; fail here with the install hint)
    except ImportError as err:
        raise UserError(f"{INSTALL_HINT} ({err}).") from err
    batch = torch.export.Dim("batch")
    backbone_only = isinstance(net, ExportedBackbone)
    input_names = INPUT_NAMES[:1] if backbone_only else INPUT_NAMES
    # A bare DigitSumNet has the two heads only; ExportedNet adds "not a digit".
    output_names = (
        OUTPUT_NAMES[:1] if backbone_only else OUTPUT_NAMES[: 4 if isinstance(net, ExportedNet) else 2]
    )
    with warnings.catch_warnings():
        # Both inputs share the one batch dimension, which the exporter remarks on; nothing is wrong.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        torch.onnx.export(
            net,
            _inputs_of(net),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes={name: {0: batch} for name in input_names},
            dynamo=True,
            external_data=False,  # one self-contained file: the weights are 90 kB
            verbose=False,
        )
    model = onnx.load(str(path))
    # The input contract travels with the file: consumers must normalise exactly as training did.
    onnx.helper.set_model_props(model, ADDITION_PROPS if backbone_only else _digit_sum_props(net))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_torchscript(net: torch.nn.Module, path: Path) -> Path:
    """The network traced to TorchScript (torch.jit.load(path)(image, number_onehot))."""
    with warnings.catch_warnings():
        # TorchScript is deprecated in recent PyTorch but still what many deployments load.
        warnings.simplefilter("ignore", FutureWarning)
        # Whether the checkpoint has a not-a-digit detector is fixed per checkpoint: a constant in the trace.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, _inputs_of(net))
        torch.jit.save(traced, str(path))
    return path


def export_paths(ckpt_path: str | Path, output_dir: str | Path | None = None) -> dict[str, Path]:
    """Where the files go: `<checkpoint stem>.onnx` and `.torchscript.pt`, in output_dir or beside the
    checkpoint."""
    ckpt_path = Path(ckpt_path)
    folder = Path(output_dir) if output_dir else ckpt_path.parent
    return {
        "onnx": folder / f"{ckpt_path.stem}.onnx",
        "torchscript": folder / f"{ckpt_path.stem}.torchscript.pt",
    }


def export(cfg: DictConfig) -> dict[str, Path]:
    """Export `cfg.ckpt_path` to the `export_paths`; print and return them."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            f"no checkpoint given: python scripts/export.py ckpt_path=<file.ckpt> [output_dir=<dir>]. "
            f"{HOW_TO_GET_ONE}"
        )
    module, _ = load_checkpoint(cfg.ckpt_path)
    paths = export_paths(cfg.ckpt_path, cfg.get("output_dir"))
    folder = paths["onnx"].parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir={folder} is a file, not a folder: name a folder to write into.")
    folder.mkdir(parents=True, exist_ok=True)
    net = EXPORTED[module.task](module.net).eval()
    export_onnx(net, paths["onnx"])
    export_torchscript(net, paths["torchscript"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths
