"""Reading a checkpoint file: the one `torch.load` of the project, and its errors for a file that is none."""

from pathlib import Path
from typing import Any

from mnist_adder.errors import UserError

HOW_TO_GET_ONE = (
    "Pass the .ckpt file of a training run, e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt "
    "(metrics.json of the run names the best one)."
)


def torch_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` on the CPU, weights only: a checkpoint is user input, so it is unpickled without
    running arbitrary code. `mmap`: the tensors are not read until used (a config alone is cheap)."""
    import torch  # here: config checks import this module before anything imports torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as a dict; a UserError for a missing file, a folder or a file that is no
    PyTorch checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist. {HOW_TO_GET_ONE}")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file. {HOW_TO_GET_ONE}")
    try:
        checkpoint = torch_load(path)
    except Exception as err:  # garbage makes the unpickler fail in many ways; all mean "not a checkpoint"
        raise UserError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"{HOW_TO_GET_ONE}"
        ) from err
    return checkpoint if isinstance(checkpoint, dict) else {}
