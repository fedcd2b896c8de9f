"""Bad configuration and bad data stop a run before any training, with one clear line naming the
value or the file and what is wrong; through the command line: exit status 2 and no traceback."""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import MissingConfigException

from mnist_adder.cli import hydra_error_line
from mnist_adder.config_checks import check_config
from mnist_adder.data import load_mnist
from mnist_adder.data.mnist import ensure_mnist
from mnist_adder.errors import UserError
from mnist_adder.training.train import train

from conftest import compose_config, make_tiny_mnist, write_idx_images, write_idx_labels

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess, *needed: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for text in needed:
        assert text in errors[0], errors[0]
    return errors[0]


# ---- configuration -------------------------------------------------------------------------------

BAD_VALUES = [
    ("model.optimizer.lr=0", "model.optimizer.lr=0", "> 0"),
    ("model.optimizer.lr=-0.01", "model.optimizer.lr=-0.01", "> 0"),
    ("data.batch_size=0", "data.batch_size=0", "at least 1"),
    ("data.batch_size=-8", "data.batch_size=-8", "at least 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0", "at least 1"),
    ("model.digit_weight=-1", "model.digit_weight=-1", ">= 0"),
    ("model.sum_weight=-0.5", "model.sum_weight=-0.5", ">= 0"),
    ("data.val_size=0", "data.val_size=0", "at least 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0", "at least 1"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1", "at least 1"),
]


@pytest.mark.parametrize("override,named,allowed", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_each_bad_value_is_named_with_what_is_allowed(make_cfg, tmp_path, override, named, allowed):
    with pytest.raises(UserError) as err:
        train(make_cfg([override]))  # stops at the check, before data, model or trainer
    message = str(err.value)
    assert named in message and allowed in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_both_loss_weights_zero_is_refused(make_cfg):
    with pytest.raises(UserError, match=r"model.digit_weight=0 and model.sum_weight=0"):
        check_config(make_cfg(["model.digit_weight=0", "model.sum_weight=0"]))
    check_config(make_cfg(["model.digit_weight=0"]))  # one head alone is a valid experiment


def test_every_bad_value_is_reported_at_once(make_cfg):
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["model.optimizer.lr=-1", "data.batch_size=0"]))
    assert "model.optimizer.lr=-1" in str(err.value) and "data.batch_size=0" in str(err.value)


def test_the_default_config_passes(make_cfg):
    check_config(make_cfg())


def test_a_checkpoint_to_resume_that_is_not_there(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"ckpt_path=.*nothing.ckpt is not a file"):
        train(make_cfg([f"ckpt_path={tmp_path / 'nothing.ckpt'}"]))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        train(make_cfg([f"ckpt_path={tmp_path / 'text.ckpt'}"]))


def test_val_split_as_large_as_the_training_set_stops_before_training(make_cfg, tiny_mnist, tmp_path):
    # The training-set size is known only once MNIST is read: checked there, by the same helper.
    with pytest.raises(UserError) as err:
        train(make_cfg([f"paths.data_dir={tiny_mnist}", "data.val_size=400"]))
    assert "data.val_size=400" in str(err.value) and "less than 400" in str(err.value)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_bad_value_on_the_command_line(tmp_path):
    result = run_cli("model.optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(result, "model.optimizer.lr=-1", "> 0")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_on_the_command_line(tmp_path):
    result = run_cli("model=resnet", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(result, "model=resnet", "large, seed, small")


def test_unknown_trainer_is_one_line_with_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:  # what Hydra raises before our code runs
        compose_config(["trainer=tpu"], tmp_path)
    line = hydra_error_line(err.value)
    assert line is not None and "\n" not in line
    assert "trainer=tpu" in line and "cpu, ddp, ddp_cpu, debug, default, gpu" in line


# ---- data ----------------------------------------------------------------------------------------


def raw(data_dir: Path) -> Path:
    return data_dir / "MNIST" / "raw"


def test_truncated_images_file(tiny_mnist):
    path = raw(tiny_mnist) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated") as err:
        load_mnist(tiny_mnist, train=True)
    assert str(path) in str(err.value)


def test_file_shorter_than_its_header(tiny_mnist):
    path = raw(tiny_mnist) / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(UserError, match="truncated") as err:
        load_mnist(tiny_mnist, train=False)
    assert str(path) in str(err.value)


def test_wrong_magic_number(tiny_mnist):
    path = raw(tiny_mnist) / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">I", 2051)  # an images magic on a labels file
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="magic number is 2051") as err:
        load_mnist(tiny_mnist, train=True)
    assert str(path) in str(err.value) and "expected 2049" in str(err.value)


def test_gzipped_file_is_named(tiny_mnist):
    path = raw(tiny_mnist) / "t10k-images-idx3-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(UserError, match="gzip") as err:
        load_mnist(tiny_mnist, train=False)
    assert str(path) in str(err.value)


def test_images_and_labels_of_different_counts(tiny_mnist):
    labels = raw(tiny_mnist) / "train-labels-idx1-ubyte"
    write_idx_labels(labels, np.arange(399) % 10)
    with pytest.raises(UserError, match="400 images but") as err:
        load_mnist(tiny_mnist, train=True)
    assert str(labels) in str(err.value) and "399 labels" in str(err.value)


def test_labels_outside_0_to_9(tiny_mnist):
    labels = raw(tiny_mnist) / "t10k-labels-idx1-ubyte"
    write_idx_labels(labels, np.full(120, 12))
    with pytest.raises(UserError, match=r"0\.\.9") as err:
        load_mnist(tiny_mnist, train=False)
    assert str(labels) in str(err.value)


def test_images_of_the_wrong_size(tmp_path):
    data_dir = make_tiny_mnist(tmp_path / "data")
    path = raw(data_dir) / "t10k-images-idx3-ubyte"
    write_idx_images(path, np.zeros((120, 32, 32)))
    with pytest.raises(UserError, match=r"\(32, 32\)") as err:
        load_mnist(data_dir, train=False)
    assert str(path) in str(err.value)


def test_existing_but_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as err:
        ensure_mnist(tmp_path / "data", download=False)
    message = str(err.value)
    assert str(raw(tmp_path / "data")) in message and "missing: train-images-idx3-ubyte" in message


def test_broken_data_stops_a_run_before_training(make_cfg, tiny_mnist, tmp_path):
    path = raw(tiny_mnist) / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        train(make_cfg([f"paths.data_dir={tiny_mnist}", "data.val_size=50", "data.download=false"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
