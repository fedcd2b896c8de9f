"""Shared fixtures: tiny IDX files written by the tests, real MNIST from DATA_DIR, composed configs."""

import importlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from mnist_adder.data import MnistSumDataModule

# Each pytest-xdist worker gets its share of the cores for torch's threads: set before torch is imported
# (this file does not import it), and inherited by the scripts the tests start. With torch's default of
# one thread per core in each worker, the threads outnumber the cores: on a busy 2-core machine a tiny
# training run took 17.6 s with 2 threads and 4.0 s with 1. OMP_NUM_THREADS, if set, wins; `pytest -n 0`
# keeps torch's default.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(workers))))

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3 as in the MNIST distribution: magic 2051, count, rows, cols (big-endian), then uint8 pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1: magic 2049, count (big-endian), then uint8 labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def make_tiny_mnist(root: Path, n_train: int = 400, n_test: int = 120, seed: int = 0) -> Path:
    """Write a small MNIST in torchvision's layout (root/MNIST/raw/...); labels cycle through 0..9."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, size=(n, 28, 28))
        for i, label in enumerate(labels):  # a bright bar whose position is the label: learnable
            images[i, 4:24, 2 + 2 * label : 4 + 2 * label] = 255
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A data directory holding a tiny MNIST (400 training, 120 test images)."""
    return make_tiny_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST from $DATA_DIR. Skipped where absent, but a failure in CI (CI=true)."""
    data_dir = os.environ.get("DATA_DIR")
    raw = Path(data_dir) / "MNIST" / "raw" if data_dir else None
    if raw is None or not (raw / "train-images-idx3-ubyte").is_file():
        message = f"real MNIST not found (DATA_DIR={data_dir!r}); .ci/run points DATA_DIR at ../shared/data"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(data_dir)


def compose_config(
    overrides: Sequence[str] = (), output_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """The config as scripts/<config_name>.py would see it, without launching a Hydra app."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_config with the run's outputs under tmp_path/run."""

    def _make(overrides: Sequence[str] = ()) -> DictConfig:
        return compose_config(overrides, tmp_path / "run")

    return _make


def make_dm(data_dir: Path, **kwargs: Any) -> "MnistSumDataModule":
    """A MnistSumDataModule on `data_dir` (small batches), prepared and set up for fit and test."""
    from mnist_adder.data import MnistSumDataModule

    defaults = dict(data_dir=data_dir, batch_size=32, eval_batch_size=50, val_size=60, download=False, seed=3)
    dm = MnistSumDataModule(**(defaults | kwargs))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def tiny_data_overrides(data_dir: Path) -> list[str]:
    """The data settings that fit `tiny_mnist` (350 training images in 14 batches), nothing of the trainer."""
    return [
        f"paths.data_dir={data_dir}",
        "data.val_size=50",
        "data.batch_size=25",
        "data.eval_batch_size=60",
    ]


def tiny_train_overrides(data_dir: Path) -> list[str]:
    """A real but small training run on `tiny_mnist`: 350 training images in 14 batches, 2 epochs."""
    return [
        *tiny_data_overrides(data_dir),
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.deterministic=true",
        *NO_DETECTOR,
    ]


# No "not a digit" detector in tiny trainings that test something else: on the tiny data's bars it would
# be meaningless, and its fit (41 s on 2 cores for real MNIST, 8 s of it drawing the not-digits once per
# process) is tested with trained_run and in tests/test_not_digit.py.
NO_DETECTOR = ("not_digit_accept=null",)


def tiny_debug_overrides(data_dir: Path) -> list[str]:
    """trainer=debug (one batch of each stage) on `tiny_mnist`, without the detector."""
    return ["trainer=debug", *tiny_data_overrides(data_dir), *NO_DETECTOR]


@pytest.fixture(scope="session")
def trained_run(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one short real-MNIST training run (small model, 2 epochs of 100 steps, validation on
    2,000 images, the full test), shared by the tests of what uses a trained model: it holds
    metrics.json, checkpoints/ and tensorboard/."""
    from mnist_adder.training.train import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    overrides = [
        f"paths.data_dir={real_data_dir}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=100",
        "trainer.limit_val_batches=1",
        "data.batch_size=128",
        "trainer.enable_progress_bar=false",
        "seed=1",
        # The default weight averaging, with a horizon of ~10 steps: one of ~100 (decay 0.99) would
        # average in the weights of the high learning rates mid-run, a blurred model (mean confidence
        # 0.56 against 0.90 for the raw weights) whose predictions flip on resampled images.
        "callbacks.ema.decay=0.9",
    ]
    train(compose_config(overrides, run_dir))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one training run on a tiny MNIST (1 epoch of 14 steps: seconds), with metrics.json,
    checkpoints/ and tensorboard/: the fast tests of what reads a run use it (`pytest -m "not slow"`);
    trained_run is the real-MNIST one. Its data is `make_tiny_mnist`'s, as `tiny_mnist` writes it."""
    from mnist_adder.training.train import train

    data_dir = make_tiny_mnist(tmp_path_factory.mktemp("tiny_run_data"))
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(compose_config([*tiny_train_overrides(data_dir), "trainer.max_epochs=1"], run_dir))
    return run_dir


def save_noise(path: Path) -> Path:
    """28x28 uniform noise, the image the Calibration section of the README shows read as "digit 8"."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return path


def save_letter(path: Path, letter: str = "W") -> Path:
    """A letter typed in black on white, in the first sans-serif font of the machine (PIL's own without).

    W: the detector of the tests' short training (trained_run) refuses 43 of the 52 letters typed so,
    and the default runs' 50 to 52; K, the letter before, is one of the 9 it lets through (score 0.48
    under its threshold). The share refused of a whole set is measured by eval not_digits=true."""
    from mnist_adder.data.not_digits import font_files

    sans = [f for f in font_files() if "Sans" in Path(f).name and "Mono" not in Path(f).name]
    font = ImageFont.truetype(sans[0], 90) if sans else ImageFont.load_default(90)
    page = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(page).text((60, 60), letter, fill=0, font=font, anchor="mm")
    page.save(path)
    return path


@pytest.fixture(scope="session")
def handed_over_ckpt(trained_run: Path) -> Path:
    """The checkpoint `trained_run` hands over (metrics.json's ckpt_path): calibrated, with its "not a
    digit" detector, as every default training run leaves it."""
    return Path(json.loads((trained_run / "metrics.json").read_text())["ckpt_path"])


@pytest.fixture(scope="session")
def calibrated_ckpt(trained_run: Path, real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `trained_run`'s best checkpoint calibrated by scripts/calibrate.py's code: with its
    temperatures and its not-a-digit detector (`<name>.calibrated.ckpt`, beside the copy)."""
    from mnist_adder.inference.calibrate import calibrate

    folder = tmp_path_factory.mktemp("calibrated_run")
    original = folder / "best.ckpt"
    shutil.copy(json.loads((trained_run / "metrics.json").read_text())["ckpt_path"], original)
    overrides = [f"ckpt_path={original}", f"paths.data_dir={real_data_dir}"]
    summary = calibrate(compose_config(overrides, folder / "run", config_name="calibrate"))
    return Path(summary["calibrated_ckpt_path"])


def require_extra(module: str, extra: str) -> Any:
    """Import `module` from an optional extra: skipped where it is missing, but a failure in CI (CI=true),
    where .ci/run installs every extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} missing: .ci/run installs the {extra} extra")
        pytest.skip(f'{module} missing: pip install -e ".[{extra}]"')
