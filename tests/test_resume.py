"""A run that dies keeps its work and continues exactly; runs repeat; a NaN loss stops a run.

The resume test kills and stops real training processes (SIGKILL, then SIGTERM) and checks that the
twice-resumed run ends with exactly the metrics of an uninterrupted run of the same config.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_adder.config_checks import check_resume
from mnist_adder.data.batches import TrainBatches
from mnist_adder.errors import UserError
from mnist_adder.inference.calibrate import calibrate
from mnist_adder.training.callbacks import NonFiniteLossError
from mnist_adder.training.train import train

from conftest import compose_config, make_tiny_mnist, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # limit_train_batches: 8 of the 14 batches of 25 tiny training images


def _start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "scripts/train.py", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _ckpt_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return None  # not there yet


def _wait_for_step(proc: subprocess.Popen, ckpt: Path, min_step: int, timeout: float = 300) -> int:
    """Poll until `ckpt` holds a global step >= min_step; return that step."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (status {proc.returncode}) before step {min_step}:\n{proc.stdout.read()}"
            )
        mtime = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        if mtime is not None and mtime != seen:
            seen = mtime
            step = _ckpt_step(ckpt)
            if step is not None and step >= min_step:
                return step
        time.sleep(0.002)
    pytest.fail(f"no checkpoint of step {min_step} within {timeout} s")


def _final(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("test/") or k == "best_val/both_acc"}


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars(tag)]


@pytest.mark.slow
def test_killed_then_terminated_run_resumes_to_the_uninterrupted_metrics(tiny_mnist, tmp_path):
    overrides = [
        *tiny_train_overrides(tiny_mnist),
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    baseline = _start([*overrides, f"hydra.run.dir={tmp_path / 'baseline'}"])
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"

    first = _start([*overrides, f"hydra.run.dir={run}"])
    _wait_for_step(first, last, 2)
    first.kill()  # SIGKILL: no chance to save anything more
    first.communicate()
    # Where the run continues from: read after the kill, as a busy machine may let the process write
    # another last.ckpt between the poll that saw step 2 and the signal.
    killed_at = _ckpt_step(last)
    assert first.returncode == -signal.SIGKILL and not (run / "metrics.json").exists()
    # Mid-epoch: the training batches must skip those already done, not start the epoch again.
    assert killed_at % STEPS_PER_EPOCH != 0

    second = _start([*overrides, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'second'}"])
    _wait_for_step(second, last, killed_at + 4)
    second.send_signal(signal.SIGTERM)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and f"ckpt_path={last}" in output  # it says how to continue
    terminated_at = _ckpt_step(last)
    assert terminated_at > killed_at + 2

    third = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            *overrides,
            f"ckpt_path={last}",
            f"hydra.run.dir={tmp_path / 'third'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    baseline.communicate(timeout=300)
    assert baseline.returncode == 0

    expected = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    resumed = json.loads((run / "metrics.json").read_text())  # the resumed runs write into their own run
    assert _final(resumed) == _final(expected)
    assert resumed["resumed_from"] == str(last)
    assert _ckpt_step(last) == _ckpt_step(tmp_path / "baseline" / "checkpoints" / "last.ckpt")
    # Each resume left its own folder with its log, pointing to the run it continued, and back.
    for session in ("second", "third"):
        assert (tmp_path / session / "resumed_into.txt").read_text().strip() == str(run.resolve())
        assert not (tmp_path / session / "metrics.json").exists()
    assert len((run / "resumes.txt").read_text().splitlines()) == 2
    # TensorBoard curves continue in the one folder, with the uninterrupted run's points. (Points the
    # killed process logged after its last checkpoint may be lost, and its steps after it re-logged.)
    assert _scalars(run, "val/both_acc") == _scalars(tmp_path / "baseline", "val/both_acc")
    step_loss = dict(_scalars(run, "train/step_loss"))
    expected_loss = dict(_scalars(tmp_path / "baseline", "train/step_loss"))
    assert set(step_loss) <= set(expected_loss)
    assert {s: v for s, v in step_loss.items() if s >= killed_at} == {
        s: v for s, v in expected_loss.items() if s >= killed_at
    }


def test_last_ckpt_holds_the_final_epoch_even_when_it_did_not_improve(tiny_mnist, tmp_path):
    # Selecting on the epoch number (mode min) makes epoch 0 the best and every later epoch "no gain":
    # ModelCheckpoint's own save_last would then leave last.ckpt at epoch 0 (Lightning 2.6).
    overrides = [
        *tiny_train_overrides(tiny_mnist),
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=4",
        "callbacks.model_checkpoint.monitor=epoch",
        "callbacks.model_checkpoint.mode=min",
    ]
    train(compose_config(overrides, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert (_ckpt_step(checkpoints / "last.ckpt"), _ckpt_step(checkpoints / "epoch_000.ckpt")) == (12, 4)


def test_training_batches_resume_mid_epoch_and_at_epoch_end(tiny_mnist):
    images, labels = torch.randn(100, 1, 28, 28), torch.arange(100) % 10

    def batches() -> TrainBatches:
        return TrainBatches(images, labels, batch_size=10, seed=5)

    full = batches()
    epoch0, epoch1 = list(full), list(full)
    interrupted = batches()
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    resumed = batches()
    resumed.load_state_dict(interrupted.state_dict())
    for got, want in zip(list(resumed), epoch0[3:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # A state taken at an epoch's end resumes with the next epoch, from its first batch.
    after_epoch = batches()
    after_epoch.load_state_dict(batches().state_dict() | {"epoch": 1, "batches_done": 0})
    assert all(torch.equal(a, b) for a, b in zip(next(iter(after_epoch)), epoch1[0], strict=True))
    finished = batches()
    list(finished)
    assert finished.state_dict() == {"epoch": 1, "batches_done": 0}


def _short(data_dir: Path, *extra: str) -> list[str]:
    # 2 epochs of 3 steps: a resume can land mid-epoch and at an epoch's end.
    return [*tiny_train_overrides(data_dir), "trainer.limit_train_batches=3", "seed=3", *extra]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny data folder and the results of one uninterrupted short run on it."""
    data_dir = make_tiny_mnist(tmp_path_factory.mktemp("data"))
    return data_dir, train(compose_config(_short(data_dir), tmp_path_factory.mktemp("run")))


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(short_run, tmp_path):
    data_dir, first = short_run
    again = train(compose_config(_short(data_dir), tmp_path / "again"))
    other = train(compose_config(_short(data_dir, "seed=4"), tmp_path / "other"))
    assert _final(first) == _final(again)
    assert _final(first)["test/loss"] != _final(other)["test/loss"]


def test_resuming_with_another_training_config_is_refused(short_run, tmp_path):
    data_dir, results = short_run
    ckpt = results["ckpt_path"]
    check_resume(
        compose_config(_short(data_dir, f"ckpt_path={ckpt}", "trainer.enable_progress_bar=true"), tmp_path)
    )
    with pytest.raises(UserError) as err:
        check_resume(compose_config(_short(data_dir, f"ckpt_path={ckpt}", "model=large", "seed=4"), tmp_path))
    message = str(err.value)
    assert "seed is 3 there, 4 here" in message and "model.net.backbone.channels" in message
    assert "\n" not in message


def test_training_on_from_a_calibrated_checkpoint_trains_the_raw_logits_and_recalibrates(short_run, tmp_path):
    data_dir, _ = short_run
    # Without weight averaging the loaded state_dict is what trains on: temperatures left in it would
    # scale the logits the loss sees, and the run would end elsewhere.
    no_ema = "callbacks.ema=null"
    uninterrupted = train(compose_config(_short(data_dir, no_ema), tmp_path / "uninterrupted"))
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _interrupt(data_dir, run, "SIGINT", 2, False, no_ema) == 1
    calibrated = calibrate(
        compose_config(
            [f"ckpt_path={last}", f"paths.data_dir={data_dir}", "not_digit_accept=null"],
            tmp_path / "calibrate",
            config_name="calibrate",
        )
    )
    assert calibrated["digit"]["temperature"] != 1.0 and calibrated["sum"]["temperature"] != 1.0

    resumed = train(
        compose_config(
            _short(data_dir, no_ema, f"ckpt_path={calibrated['calibrated_ckpt_path']}"), tmp_path / "session"
        )
    )
    assert _final(resumed) == _final(uninterrupted)
    # ... and it fitted its own temperatures at its end, as the uninterrupted run did.
    for key in ("digit_temperature", "sum_temperature"):
        assert resumed[key] == uninterrupted[key] != 1.0, key


class SignalAt(pl.Callback):
    """Sends this process a real signal (SIGINT is Ctrl-C) at a point of training."""

    def __init__(self, signal_name: str, step: int, at_validation: bool = False) -> None:
        self.signum, self.step, self.at_validation = signal.Signals[signal_name], step, at_validation

    def _maybe_send(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        if not self.at_validation:
            self._maybe_send(trainer)

    def on_validation_start(self, trainer: pl.Trainer, *_: object) -> None:
        if self.at_validation:
            self._maybe_send(trainer)


def _interrupt(
    data_dir: Path, run: Path, signal_name: str, step: int, at_validation: bool, *overrides: str
) -> int:
    """Train with SignalAt sending `signal_name` at `step`; the exit status."""
    send = [
        "+callbacks.signal._target_=test_resume.SignalAt",
        f"+callbacks.signal.signal_name={signal_name}",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.at_validation={at_validation}",
    ]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Ctrl-C as a terminal delivers it: a test process started with SIGINT ignored (a background job of
    # a shell without job control, some CI runners) would otherwise never see it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            train(compose_config(_short(data_dir, *overrides, *send), run))
    finally:
        for signum, handler in handlers.items():  # Lightning ignores a second Ctrl-C while it stops
            signal.signal(signum, handler)
    return stopped.value.code


@pytest.mark.parametrize(
    "signal_name,step,at_validation,status",
    [
        # Ctrl-C mid-epoch: Lightning exits with status 1. Slow: the SIGTERM case keeps the path in the
        # one-minute loop.
        pytest.param("SIGINT", 2, False, 1, marks=pytest.mark.slow),
        ("SIGTERM", 3, True, 128 + signal.SIGTERM),  # during the first validation, at the epoch's end
    ],
    ids=["ctrl-c-mid-epoch", "sigterm-at-epoch-end"],
)
def test_an_interrupted_run_saves_last_ckpt_and_resumes_exactly(
    short_run, tmp_path, signal_name, step, at_validation, status
):
    data_dir, uninterrupted = short_run
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _interrupt(data_dir, run, signal_name, step, at_validation) == status
    assert _ckpt_step(last) == step and not (run / "metrics.json").exists()
    resumed = train(compose_config(_short(data_dir, f"ckpt_path={last}"), tmp_path / "session"))
    assert _final(resumed) == _final(uninterrupted)
    assert json.loads((run / "metrics.json").read_text())["resumed_from"] == str(last)


# Weight averaging (callbacks=ema) with a decay short enough to matter in 6 steps; 3 validation batches,
# so that a SIGTERM during validation stops it mid-pass, while the averaged weights are swapped in; every
# epoch's checkpoint kept, to compare with.
EMA = (
    "callbacks=ema",
    "callbacks.ema.decay=0.5",
    "data.eval_batch_size=20",
    "callbacks.model_checkpoint.save_top_k=-1",
)


@pytest.fixture(scope="module")
def short_ema_run(short_run, tmp_path_factory) -> tuple[Path, dict]:
    """short_run's data folder and the results of one uninterrupted short run with weight averaging."""
    data_dir, _ = short_run
    return data_dir, train(compose_config(_short(data_dir, *EMA), tmp_path_factory.mktemp("ema_run")))


def _same_weights(got: Path, expected: Path) -> None:
    got_ckpt, expected_ckpt = (torch.load(p, weights_only=False) for p in (got, expected))
    # The temperatures are fitted after the fit and written into the checkpoint handed over, which may
    # be the one compared with here (epoch_000.ckpt when epoch 0 validated best): not training's weights.
    fitted_after = {name for name in expected_ckpt["state_dict"] if name.endswith("_temperature")}
    for key in ("state_dict", "current_model_state"):  # the average, and the weights trained on
        for name, value in expected_ckpt[key].items():
            assert name in fitted_after or torch.equal(got_ckpt[key][name], value), (key, name)


def test_an_interrupted_ema_run_resumes_exactly(short_ema_run, tmp_path):
    data_dir, uninterrupted = short_ema_run
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _interrupt(data_dir, tmp_path / "run", "SIGINT", 2, False, *EMA) == 1 and _ckpt_step(last) == 2
    resumed = train(compose_config(_short(data_dir, *EMA, f"ckpt_path={last}"), tmp_path / "session"))
    assert _final(resumed) == _final(uninterrupted)
    _same_weights(last, Path(uninterrupted["ckpt_path"]).parent / "last.ckpt")


def test_an_ema_run_stopped_mid_validation_saves_the_weights_it_trains_on(short_ema_run, tmp_path):
    data_dir, uninterrupted = short_ema_run
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _interrupt(data_dir, tmp_path / "run", "SIGTERM", 3, True, *EMA) == 128 + signal.SIGTERM
    # Saved after the first of 3 validation batches of epoch 0: the same average and raw weights as the
    # uninterrupted run's checkpoint after that validation, not the two swapped.
    assert _ckpt_step(last) == 3
    _same_weights(last, Path(uninterrupted["ckpt_path"]).parent / "epoch_000.ckpt")


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoint_before_it(tiny_mnist, tmp_path):
    # A learning rate of 1e30 is a real way to blow up: weights of ~1e28 after one Adam step overflow
    # the next forward pass. Checks run only at logging steps (every 50) and before checkpoints.
    overrides = _short(
        tiny_mnist,
        "trainer.max_epochs=1",
        "model.optimizer.lr=1e30",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "trainer.log_every_n_steps=50",
    )
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(compose_config(overrides, run))
    message = str(err.value)
    found = re.search(r"at epoch (\d+), step (\d+)", message)
    assert found, message
    epoch, step = int(found.group(1)), int(found.group(2))
    assert epoch == 0 and step >= 1
    last = run / "checkpoints" / "last.ckpt"
    assert str(last) in message
    kept = torch.load(last, map_location="cpu", weights_only=False)
    assert kept["global_step"] == step  # the state the non-finite step started from, no later
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values() if t.is_floating_point())
    assert not (run / "metrics.json").exists()
    assert "\n" not in message
