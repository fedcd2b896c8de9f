"""Reading MNIST through torchvision, decoded once into tensors, and its one normalisation."""

from pathlib import Path

import torch
from torchvision.datasets import MNIST

from mnist_adder.errors import UserError

# Mean and std of the 60,000 training images on a 0..1 scale; every consumer (training, eval,
# predict, export) normalises through `normalize` so there is one definition.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 28, 28] -> float32 images normalised with the MNIST mean and std."""
    return (images_uint8.float().div_(255.0) - MNIST_MEAN) / MNIST_STD


def _missing_data_message(data_dir: Path, download: bool, cause: BaseException) -> str:
    raw = data_dir / "MNIST" / "raw"
    how = "the download failed (no network?)" if download else "downloading is off (data.download=false)"
    return (
        f"MNIST is not in {raw}, and {how}. The folder must hold the four uncompressed files "
        f"{', '.join(MNIST_FILES)}. The data folder is paths.data_dir, which is $DATA_DIR when set, "
        f"else data/ in the project: set DATA_DIR (or paths.data_dir=...) to a folder that has MNIST/raw/, "
        f"or run once with network access and data.download=true. ({type(cause).__name__}: {cause})"
    )


def ensure_mnist(data_dir: str | Path, download: bool) -> None:
    """Make sure the raw files are present, downloading them if allowed; a clear UserError if not."""
    data_dir = Path(data_dir)
    try:
        for train in (True, False):
            MNIST(str(data_dir), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise UserError(_missing_data_message(data_dir, download, err)) from err


def load_mnist(
    data_dir: str | Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of the training or test split."""
    data_dir = Path(data_dir)
    try:
        dataset = MNIST(str(data_dir), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise UserError(_missing_data_message(data_dir, download, err)) from err
    return dataset.data, dataset.targets.long()
