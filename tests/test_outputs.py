"""No run writes over another's folder; an unwritable folder or a full disk is a clear error, never a
half-written metrics.json."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mnist_adder.results
from mnist_adder.errors import UserError
from mnist_adder.results import write_json_atomic
from mnist_adder.training.run_dir import claim_output_dir
from mnist_adder.training.train import train

from conftest import compose_config, tiny_debug_overrides

ROOT = Path(__file__).resolve().parents[1]


def debug_run(data_dir: Path, *extra: str) -> list[str]:
    return [*tiny_debug_overrides(data_dir), *extra]


@pytest.mark.slow
def test_two_runs_started_at_once_get_their_own_folders(tiny_mnist, tmp_path):
    # Hydra's default run folder (logs/train/runs/<date_time_microseconds>), under a test log folder.
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "scripts/train.py",
                *debug_run(tiny_mnist, f"seed={seed}", f"paths.log_dir={tmp_path}"),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    folders = sorted((tmp_path / "train" / "runs").iterdir())
    assert len(folders) == 2
    assert sorted(json.loads((f / "metrics.json").read_text())["seed"] for f in folders) == [1, 2]


def test_a_folder_with_another_runs_results_is_refused(tiny_mnist, tmp_path):
    run = tmp_path / "run"
    train(compose_config(debug_run(tiny_mnist), run))
    before = (run / "metrics.json").read_bytes()
    with pytest.raises(UserError, match="already holds another run's outputs") as err:
        train(compose_config(debug_run(tiny_mnist, "seed=7"), run))
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in str(err.value)
    assert (run / "metrics.json").read_bytes() == before


def test_a_folder_with_checkpoints_is_refused_unless_resumed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    with pytest.raises(UserError, match=r"checkpoints/"):
        claim_output_dir(run, None)
    # Resuming it on purpose (hydra.run.dir=<run> ckpt_path=<run>/checkpoints/last.ckpt) is allowed.
    assert claim_output_dir(run, run / "checkpoints" / "last.ckpt") == run.resolve()
    # From a fresh folder, an unfinished run is continued in its own folder, linked both ways ...
    assert claim_output_dir(tmp_path / "new", run / "checkpoints" / "last.ckpt") == run.resolve()
    assert (tmp_path / "new" / "resumed_into.txt").read_text().strip() == str(run.resolve())
    # ... but a finished one (it has metrics.json) is never written over.
    (run / "metrics.json").write_text("{}")
    assert claim_output_dir(tmp_path / "newer", run / "checkpoints" / "last.ckpt") == (tmp_path / "newer")


def test_unwritable_run_folder_stops_before_training(tiny_mnist, tmp_path):
    # Tests run as root here, where a read-only folder (chmod) stays writable: a folder below a
    # regular file can never be created, for any user.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to the run folder") as err:
        train(compose_config(debug_run(tiny_mnist), blocker / "run"))
    assert str(blocker / "run") in str(err.value)


def test_unwritable_run_folder_on_the_command_line(tiny_mnist, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "scripts/train.py", *debug_run(tiny_mnist), f"hydra.run.dir={blocker / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(blocker / "run") in errors[0], result.stderr


def _disk_full(fd: int) -> None:
    # A full disk cannot be made here; fsync is where a real one reports it for buffered writes.
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_never_leaves_half_a_metrics_json(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"test/both_acc": 0.5})
    monkeypatch.setattr(mnist_adder.results.os, "fsync", _disk_full)
    with pytest.raises(OSError):
        write_json_atomic(path, {"test/both_acc": 0.9, "more": list(range(1000))})
    assert json.loads(path.read_text()) == {"test/both_acc": 0.5}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_a_full_disk_at_the_end_of_a_run_is_a_clear_error(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_adder.results.os, "fsync", _disk_full)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="No space left on device") as err:
        train(compose_config(debug_run(tiny_mnist), run))
    assert str(run / "metrics.json") in str(err.value)
    assert not list(run.glob("*metrics.json*"))
