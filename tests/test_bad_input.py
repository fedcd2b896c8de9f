"""Bad configuration and bad data stop a run before any training, with one clear line naming the
value or the file and what is wrong; through the command line: exit status 2 and no traceback."""

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import OmegaConf

from mnist_adder import config_checks
from mnist_adder.cli import build, hydra_error_line
from mnist_adder.config_checks import check_config
from mnist_adder.data import load_mnist
from mnist_adder.data.mnist import ensure_mnist
from mnist_adder.errors import UserError
from mnist_adder.evaluation.evaluate import evaluate
from mnist_adder.training.train import train

from conftest import compose_config, make_tiny_mnist, write_idx_images, write_idx_labels

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *overrides: str, script: str = "train", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    # A script that gets as far as importing torch takes seconds (many more on a busy machine): those
    # tests are marked slow; a config mistake is told before torch loads, and those tests stay fast.
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
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
    ("seed=abc", "seed='abc'", "a seed must be a whole number from 0 to 4294967295"),
    ("seed=-1", "seed=-1", "a seed must be a whole number"),
    ("seed=4294967296", "seed=4294967296", "a seed must be a whole number"),
    ("data.pair_seed=1.5", "data.pair_seed=1.5", "a seed must be a whole number"),
    ("data.split_seed=null", "data.split_seed=None", "a seed must be a whole number"),
    ("calibrate=yes", "calibrate='yes'", "it must be true or false"),
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
    assert "trainer=tpu" in line and "auto, cpu, ddp, ddp_cpu, debug, default, gpu, mps" in line


def test_a_seed_that_is_not_a_number_on_the_command_line(tmp_path):
    result = run_cli("seed=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(result, "seed='abc'", "whole number from 0 to 4294967295")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override", ["seed=abc", "model=nope", "data.batch_size=0"])
def test_a_config_mistake_is_told_before_torch_loads(tmp_path, override):
    # Loading torch and Lightning takes seconds; a typo or a bad value is told without them.
    result = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 2 and "error: " in result.stderr
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "pytorch_lightning", "torchvision"}


def test_seed_interpolated_into_the_data_is_reported_once(make_cfg):
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["seed=abc"]))  # data.seed is ${seed}: one problem, not two
    assert str(err.value).count("'abc'") == 1


# ---- the device: a trainer this machine cannot run ------------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.mark.slow
@NO_CUDA
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainer_without_a_gpu_says_what_to_run_instead(tmp_path, trainer):
    result = run_cli(f"trainer={trainer}", f"hydra.run.dir={tmp_path / 'run'}")
    want = "trainer=mps" if torch.backends.mps.is_available() else "trainer=cpu"
    line = assert_one_clear_line(
        result, f"trainer.accelerator=gpu (trainer={trainer}) needs a CUDA GPU", want, "trainer=auto"
    )
    has = "an Apple MPS device" if torch.backends.mps.is_available() else "only a CPU"
    assert f"this machine has {has}" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@NO_CUDA
def test_gpu_trainer_without_a_gpu_is_refused_before_anything_is_built(make_cfg):
    # The fast version of the test above: the same check, in this process.
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["trainer=gpu"]))
    message = str(err.value)
    want = "trainer=mps" if torch.backends.mps.is_available() else "trainer=cpu"
    assert "trainer.accelerator=gpu (trainer=gpu) needs a CUDA GPU" in message and want in message


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple MPS device")
def test_mps_trainer_without_mps_says_what_to_run_instead(tmp_path):
    result = run_cli("trainer=mps", f"hydra.run.dir={tmp_path / 'run'}")
    want = "trainer=gpu" if torch.cuda.is_available() else "trainer=cpu"
    assert_one_clear_line(result, "trainer.accelerator=mps (trainer=mps) needs an Apple MPS device", want)


def test_on_an_apple_machine_the_gpu_trainer_points_to_mps(monkeypatch, make_cfg):
    # No Apple machine here: what torch reports about the devices is faked, the check itself is real.
    monkeypatch.setattr(config_checks, "has_cuda", lambda: False)
    monkeypatch.setattr(config_checks, "has_mps", lambda: True)
    monkeypatch.setattr("mnist_adder.devices.has_cuda", lambda: False)
    monkeypatch.setattr("mnist_adder.devices.has_mps", lambda: True)
    with pytest.raises(UserError) as err:
        check_config(make_cfg(["trainer=gpu"]))
    message = str(err.value)
    assert "this machine has an Apple MPS device and no CUDA GPU" in message
    assert "run with trainer=mps instead, or trainer=auto" in message
    check_config(make_cfg(["trainer=mps"]))  # and MPS is then fine


@pytest.mark.slow
@NO_CUDA
def test_eval_on_an_accelerator_this_machine_lacks(tmp_path):
    # Checked before the checkpoint is read; eval sets the accelerator by its key, not a trainer choice.
    result = run_cli(
        f"ckpt_path={tmp_path / 'x.ckpt'}",
        "trainer.accelerator=gpu",
        f"hydra.run.dir={tmp_path / 'e'}",
        script="eval",
    )
    assert_one_clear_line(
        result, "trainer.accelerator=gpu needs a CUDA GPU", "trainer.accelerator=cpu instead"
    )


@pytest.mark.slow
@NO_CUDA
def test_eval_of_a_gpu_checkpoint_here_names_the_checkpoints_accelerator(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["trainer"]["accelerator"] = "gpu"  # as if trained on a GPU
    torch.save(checkpoint, tmp_path / "gpu.ckpt")
    with pytest.raises(UserError) as err:
        evaluate(compose_config([f"ckpt_path={tmp_path / 'gpu.ckpt'}"], tmp_path / "e", "eval"))
    message = str(err.value)
    assert "trainer.accelerator=gpu needs a CUDA GPU" in message and "trainer.accelerator=cpu" in message
    assert "trained with accelerator=gpu" in message and "\n" not in message


@pytest.mark.slow
@NO_CUDA
def test_benchmark_on_a_gpu_this_machine_lacks(tmp_path):
    result = run_cli("trainer=gpu", f"hydra.run.dir={tmp_path / 'b'}", script="benchmark")
    assert_one_clear_line(result, "trainer.accelerator=gpu", "needs a CUDA GPU", "trainer=cpu")


# ---- a value a constructor refuses -----------------------------------------------------------------

REFUSED = [
    # (override, the key named, the constructor's own reason)
    ("model.net.adder_input=foo", "model.net (mnist_adder.models.digit_sum.DigitSumNet)", "not 'foo'"),
    (
        "trainer.precision=foo",
        "trainer (pytorch_lightning.trainer.trainer.Trainer)",
        "Precision 'foo' is invalid",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("override,named,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_value_the_constructor_refuses_is_one_line(tmp_path, override, named, reason):
    result = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(result, f"{named} cannot be built", f"(given: {override})", reason)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_with_hydra_full_error_the_constructor_error_keeps_its_traceback(tmp_path):
    result = run_cli(
        "model.net.adder_input=foo", f"hydra.run.dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"}
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "InstantiationException" in result.stderr
    assert "ValueError: adder_input must be logits, softmax or detached, not 'foo'" in result.stderr


@pytest.mark.parametrize(
    "override,named,reason",
    [
        # Lightning's MisconfigurationException from a callback, and a Trainer refusing a value.
        ("callbacks.model_checkpoint.mode=sideways", "callbacks.model_checkpoint (", "`mode` can be"),
        ("trainer.devices=abc", "trainer (", "`devices`"),
    ],
)
def test_every_config_object_is_built_by_the_one_helper(make_cfg, tiny_mnist, override, named, reason):
    with pytest.raises(UserError) as err:
        train(make_cfg([f"paths.data_dir={tiny_mnist}", "data.val_size=50", override]))
    message = str(err.value)
    assert named in message and reason in message and "\n" not in message


def test_an_error_that_may_be_a_bug_keeps_its_traceback(tmp_path):
    # A refused value (a TypeError from the constructor) is one line, also where Hydra builds the object
    # itself (a launcher, a sweeper) and the error reaches cli.run_hydra_main through hydra_error_line.
    node = OmegaConf.create({"launcher": {"_target_": "datetime.timedelta", "days": "x"}})
    with pytest.raises(InstantiationException) as refused:
        hydra.utils.instantiate(node.launcher)
    line = hydra_error_line(refused.value)
    assert line is not None and line.startswith("launcher (datetime.timedelta) cannot be built")
    assert "unsupported type for timedelta days component: str" in line
    # Not a refused value (a missing file inside a constructor): no one-line message hides it.
    node = OmegaConf.create({"thing": {"_target_": "torch.load", "f": str(tmp_path / "nothing.pt")}})
    with pytest.raises(InstantiationException) as err:
        build(node.thing, "thing")
    assert isinstance(err.value.__cause__, FileNotFoundError)
    assert hydra_error_line(err.value) is None  # and cli.run_hydra_main re-raises it: the traceback


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
