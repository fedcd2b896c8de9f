"""Reading MNIST through torchvision, decoded once into tensors, and its one normalisation.

The raw IDX files are checked before torchvision reads them: torchvision reports a truncated or foreign
file as a bare shape or assertion error, and reads image and label files of different lengths without
a word. Here each problem is a UserError that names the file and what is wrong with it.
"""

import math
import struct
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from mnist_adder.classes import NUM_DIGITS
from mnist_adder.config_checks import check_val_size
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


# IDX headers (big-endian): a magic number (0x0000, dtype 0x08 = uint8, number of dimensions), then
# one uint32 per dimension. The images are [N, 28, 28], the labels [N].
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
IMAGE_SIZE = 28
GZIP_MAGIC = b"\x1f\x8b"


def split_files(train: bool) -> tuple[str, str]:
    """(images file, labels file) of the training or the test split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def raw_folder(data_dir: str | Path) -> Path:
    """Where torchvision keeps the four IDX files under a data folder."""
    return Path(data_dir) / "MNIST" / "raw"


def _fix_hint() -> str:
    return (
        "Replace it with the original uncompressed MNIST file (delete it and run once with "
        "data.download=true and network access, or copy it again)."
    )


def _idx_count(path: Path, magic: int, item_shape: tuple[int, ...], kind: str) -> int:
    """Check one IDX file's header and length against what MNIST needs; return its number of items."""
    header_len = 4 + 4 * (1 + len(item_shape))
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(header_len)
    if header[:2] == GZIP_MAGIC:
        raise UserError(f"{path} is gzip-compressed; MNIST files must be uncompressed: gunzip it.")
    if size < header_len:
        raise UserError(
            f"{path} is truncated: it has {size} bytes, fewer than its {header_len}-byte IDX header. "
            + _fix_hint()
        )
    found_magic, count, *dims = struct.unpack(f">{2 + len(item_shape)}I", header)
    if found_magic != magic:
        raise UserError(
            f"{path} is not an MNIST {kind} file: its IDX magic number is {found_magic} "
            f"(0x{found_magic:08x}), expected {magic} (0x{magic:08x}). " + _fix_hint()
        )
    if tuple(dims) != item_shape:
        raise UserError(
            f"{path} holds {kind} of shape {tuple(dims)}, expected {item_shape} (28x28 MNIST). " + _fix_hint()
        )
    if count == 0:
        raise UserError(f"{path} holds no {kind} (its header announces 0). " + _fix_hint())
    expected = header_len + count * math.prod(item_shape)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise UserError(
            f"{path} is {what}: its header announces {count} {kind}, which take {expected} bytes, "
            f"but the file has {size}. " + _fix_hint()
        )
    return count


def check_raw_files(data_dir: str | Path, train: bool) -> None:
    """Check that one split's image and label files are present, whole, and of the same length."""
    raw = raw_folder(data_dir)
    images_name, labels_name = split_files(train)
    images_path, labels_path = raw / images_name, raw / labels_name
    missing = [p.name for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        cause = FileNotFoundError(f"missing: {', '.join(missing)}")
        raise UserError(_missing_data_message(Path(data_dir), False, cause))
    n_images = _idx_count(images_path, IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE), "images")
    n_labels = _idx_count(labels_path, LABELS_MAGIC, (), "labels")
    if n_images != n_labels:
        raise UserError(
            f"{images_path} holds {n_images} images but {labels_path} holds {n_labels} labels: "
            "they must pair one to one, so one of them is from another copy of MNIST. " + _fix_hint()
        )


def validation_split(
    count: int, val_size: int, split_seed: int, minimum: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of the `count` MNIST training images: the one split every
    data module of the project holds out, fixed by `split_seed`. `minimum`: the smallest `val_size`
    the caller can work with (0: every image may train)."""
    check_val_size(val_size, count, minimum)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:], order[:val_size]


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 28, 28] -> float32 images normalised with the MNIST mean and std."""
    return (images_uint8.float().div_(255.0) - MNIST_MEAN) / MNIST_STD


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to pixels in 0..1 (the inverse of `normalize`, less its /255)."""
    return (images * MNIST_STD + MNIST_MEAN).clamp(0, 1)


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to the uint8 pixels they were made from (the inverse of `normalize`), on
    the CPU."""
    return (to_pixels(images.detach().float().cpu()) * 255).round().to(torch.uint8)


def _missing_data_message(data_dir: Path, download: bool, cause: BaseException) -> str:
    raw = raw_folder(data_dir)
    how = "the download failed (no network?)" if download else "downloading is off (data.download=false)"
    return (
        f"MNIST is not in {raw}, and {how}. The folder must hold the four uncompressed files "
        f"{', '.join(MNIST_FILES)}. The data folder is paths.data_dir, which is $DATA_DIR when set, "
        f"else data/ in the project: set DATA_DIR (or paths.data_dir=...) to a folder that has MNIST/raw/, "
        f"or run once with network access and data.download=true. ({type(cause).__name__}: {cause})"
    )


def ensure_mnist(data_dir: str | Path, download: bool) -> None:
    """Make sure the raw files are present (downloading them if allowed) and sound; a UserError if not."""
    data_dir = Path(data_dir)
    raw = raw_folder(data_dir)
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        if not download:
            cause = FileNotFoundError(f"missing: {', '.join(missing)}")
            raise UserError(_missing_data_message(data_dir, download, cause))
        try:
            for train in (True, False):
                MNIST(str(data_dir), train=train, download=True)
        except (RuntimeError, OSError) as err:
            raise UserError(_missing_data_message(data_dir, download, err)) from err
    for train in (True, False):
        check_raw_files(data_dir, train)


def load_mnist(
    data_dir: str | Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of the training or test split."""
    data_dir = Path(data_dir)
    if download:
        ensure_mnist(data_dir, download=True)
    check_raw_files(data_dir, train)
    try:
        dataset = MNIST(str(data_dir), train=train, download=False)
    except (RuntimeError, OSError) as err:
        raise UserError(_missing_data_message(data_dir, download, err)) from err
    labels = dataset.targets.long()
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_DIGITS:
        labels_path = raw_folder(data_dir) / split_files(train)[1]
        raise UserError(
            f"{labels_path} holds labels from {int(labels.min())} to {int(labels.max())}; MNIST labels "
            f"are digits 0..9. " + _fix_hint()
        )
    return dataset.data, labels
