"""The results page (scripts/report.py --out): written from run folders, written again from runs.json alone.

The fast tests build run folders as the scripts leave them (`.hydra/`, metrics.json, TensorBoard events,
robustness.json, calibration.json) with made-up numbers, to check that every number on the page is the
one in those files; the slow test makes real runs on the tiny IDX files with train, eval and calibrate.
"""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from mnist_adder.errors import UserError
from mnist_adder.reporting.report import build_report
from mnist_adder.reporting.results_page import build_results
from mnist_adder.training.metrics import ECE_BINS

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "learning_curves.png",
    "speed.png",
    "heldout_pairs.png",
    "reliability.png",
    "robustness.png",
    "not_digits.png",
}


def run_script(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    script = str(ROOT / args[0])
    return subprocess.run(
        [sys.executable, script, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_job(job_dir: Path, task: str, overrides: list[str], choices: dict[str, str] | None = None) -> None:
    """The `.hydra/` folder Hydra writes for a job of scripts/<task>.py."""
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"task_name": task}), hydra_dir / "config.yaml")
    OmegaConf.save(
        OmegaConf.create({"hydra": {"runtime": {"choices": choices or {}}}}), hydra_dir / "hydra.yaml"
    )


def bins(shift: float) -> dict[str, list[float]]:
    counts = [0.0] * (ECE_BINS - 3) + [5.0, 10.0, 85.0]
    confidence = [0.0] * (ECE_BINS - 3) + [0.85, 0.9, 0.97]
    return {"count": counts, "confidence": confidence, "accuracy": [min(c + shift, 1.0) for c in confidence]}


def write_train_run(run_dir: Path, model: str, seed: int, digit: float, fit: float) -> None:
    overrides = [f"paths.data_dir={run_dir.parents[1] / 'data'}", f"model={model}", f"seed={seed}"]
    write_job(run_dir, "train", overrides, {"model": model})
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "epoch_002.ckpt").write_bytes(b"")
    metrics = {
        "test/digit_acc": digit,
        "test/sum_acc": digit - 0.01,
        "test/both_acc": digit - 0.02,
        "test/sum_given_digit_acc": 0.99,
        "test/sum_acc_seen_pairs": digit,
        "test/sum_acc_unseen_pairs": 0.0,
        "num_parameters": 1000 if model == "small" else 2000,
        "fit_seconds": fit,
        "seed": seed,
        "model": model,
        "ckpt_path": str(run_dir / "checkpoints" / "epoch_002.ckpt"),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for epoch in range(3):
            step = 10 * (epoch + 1) - 1
            writer.add_scalar("epoch", epoch, step)
            writer.add_scalar("val/digit_acc", digit - 0.1 * (2 - epoch), step)
            writer.add_scalar("val/sum_acc", digit - 0.1 * (2 - epoch), step)
            writer.add_scalar("val/loss", 1.0 / (epoch + 1), step)
            writer.add_scalar("train/loss", 1.2 / (epoch + 1), step)


def write_eval_and_calibrate_runs(logs: Path, train_run: Path) -> None:
    ckpt = str(train_run / "checkpoints" / "epoch_002.ckpt")
    eval_dir = logs / "eval"
    write_job(eval_dir, "eval", [f"ckpt_path={ckpt}", "robustness=true"])
    rows = [
        {"corruption": "none", "severity": 0, "level": 0.0, "unit": "", "digit_acc": 0.9, "sum_acc": 0.89}
    ]
    rows += [
        {
            "corruption": "rotation",
            "severity": s,
            "level": 15.0 * s,
            "unit": "degrees",
            "digit_acc": 0.9 - 0.2 * s,
            "sum_acc": 0.88 - 0.2 * s,
        }
        for s in (1, 2, 3)
    ]
    (eval_dir / "robustness.json").write_text(
        json.dumps({"ckpt_path": ckpt, "images": 100, "seed": 0, "results": rows})
    )
    calibrate_dir = logs / "calibrate"
    write_job(calibrate_dir, "calibrate", [f"ckpt_path={ckpt}"])
    head = {
        "temperature": 0.5,
        "val_nll_before": 0.2,
        "val_nll_after": 0.1,
        "test_ece_before": 0.0512,
        "test_ece_after": 0.0034,
        "test_reliability_before": bins(0.02),
        "test_reliability_after": bins(0.0),
    }
    summary = {"ckpt_path": ckpt, "calibrated_ckpt_path": ckpt.replace(".ckpt", ".calibrated.ckpt")}
    (calibrate_dir / "calibration.json").write_text(json.dumps(summary | {"digit": head, "sum": head}))


def write_not_digits_run(eval_dir: Path, train_run: Path, refused: float) -> None:
    """An eval run with not_digits=true of the run's calibrated checkpoint (the file calibrate writes)."""
    ckpt = str(train_run / "checkpoints" / "epoch_002.calibrated.ckpt")
    write_job(eval_dir, "eval", [f"ckpt_path={ckpt}", "not_digits=true"])
    kinds = {"uniform_noise": 400, "letters": 416}

    def method(auroc: float, share: float) -> dict:
        return {
            "auroc_mnist_test": auroc,
            "auroc_photos": auroc - 0.01,
            "threshold": 1.5,
            "not_digits_refused": share,
            "refused_by_kind": {"uniform_noise": share, "letters": share},
            "mnist_test_accepted": 0.99,
            "photos_accepted": 0.98,
            "validation_accepted": 0.99,
            "examples_accepted": {"seven.png": True, "two.jpg": share > 0.5},
            "letters_refused": {"A": share},  # detail the page leaves out
        }

    report = {
        "ckpt_path": ckpt,
        "seed": 0,
        "examples": ["/somewhere/on/this/machine/seven.png"],
        "not_digits": kinds,
        "methods": {"max_softmax": method(0.8, refused / 4), "not_digit": method(0.99, refused)},
    }
    (eval_dir / "not_digits.json").write_text(json.dumps(report))


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Two configurations of two seeds each, one run tested under corruptions and calibrated."""
    logs = tmp_path / "logs"
    runs = {
        ("small", 1): (0.91, 10.0),
        ("small", 2): (0.93, 12.0),
        ("seed", 1): (0.95, 40.0),
        ("seed", 2): (0.97, 44.0),
    }
    for k, ((model, seed), (digit, fit)) in enumerate(runs.items()):
        write_train_run(logs / "sweep" / str(k), model, seed, digit, fit)
    write_eval_and_calibrate_runs(logs, logs / "sweep" / "0")
    for k, refused in ((0, 0.9), (1, 0.98)):
        write_not_digits_run(logs / f"eval_not_digits_{k}", logs / "sweep" / str(k), refused)
    return logs


def test_page_numbers_come_from_the_runs_and_runs_json_alone_gives_the_same_page(logs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page, notes = build_results([Path("logs")], Path("out"))
    assert notes == [] and page == Path("out/index.md")
    text = page.read_text()
    assert {p.name for p in Path("out").glob("*.png")} == FIGURES
    assert all(f"]({name})" in text for name in FIGURES)
    # The table's means over seeds are those of the metrics.json files.
    small = statistics.fmean([0.91, 0.93])
    assert re.search(rf"\| `model=small` \| 2 \| 1,2 \| {100 * small:.2f} ± ", text), text
    assert "| `model=seed` | 2 | 1,2 | 96.00 ± 1.41 |" in text
    # Robustness and calibration of the run whose checkpoint they tested, with their numbers.
    assert "| `rotation` | 3 | 45 degrees | 30.00 | 28.00 |" in text
    assert "| `model=small` | logs/sweep/0 | digit | 0.5000 | 0.2000 | 0.1000 | 0.0512 | 0.0034 |" in text
    # "Not a digit": mean ± std over the two small runs measured, per method; the worst run's examples.
    assert (
        "| `model=small` | 2 | not_digit: the detector (this project) | 0.9900 ± 0.0000 | 0.9800 ± 0.0000 "
        "| 94.0 ± 5.7 | 99.0 ± 0.0 | 98.0 ± 0.0 | 2/2 |" in text
    ), text
    assert "| `model=small` | 2 | max softmax (Hendrycks & Gimpel 2017) | 0.8000 ± 0.0000 |" in text
    assert "| 23.5 ± 1.4 | 99.0 ± 0.0 | 98.0 ± 0.0 | 1/2 |" in text
    assert "python scripts/report.py logs --out out" in text
    assert "python scripts/report.py out/runs.json --out out" in text

    summary = json.loads(Path("out/runs.json").read_text())
    assert [run["name"] for run in summary["runs"]] == [f"logs/sweep/{k}" for k in range(4)]
    first = summary["runs"][0]
    assert first["curves"]["val/digit_acc"] == [
        [1, pytest.approx(0.71)],
        [2, pytest.approx(0.81)],
        [3, pytest.approx(0.91)],
    ]
    assert first["metrics"]["ckpt_path"] == "checkpoints/epoch_002.ckpt"
    assert first["robustness"]["ckpt_path"] == "checkpoints/epoch_002.ckpt"
    # Nothing of this machine in a file meant to be committed: no absolute path, no data folder.
    assert str(tmp_path) not in Path("out/runs.json").read_text() + text

    figures = {name: Path("out", name).read_bytes() for name in FIGURES}
    again, _ = build_results([Path("out/runs.json")], Path("again"))
    assert again.read_text() == text
    assert {name: Path("again", name).read_bytes() for name in FIGURES} == figures
    # In place, as the regenerate command says: runs.json stays as it was.
    before = Path("out/runs.json").read_text()
    build_results([Path("out/runs.json")], Path("out"))
    assert Path("out/runs.json").read_text() == before and page.read_text() == text
    # The plain table reads runs.json too, and skips the eval and calibrate runs of a folder.
    table, _ = build_report([Path("out/runs.json")])
    assert table.split("\n\n", 1)[1] == build_report([Path("logs")])[0].split("\n\n", 1)[1]


def test_results_of_a_checkpoint_of_no_run_given_are_named_not_guessed(logs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, notes = build_results([Path("logs/sweep/1"), Path("logs/eval"), Path("logs/calibrate")], Path("out"))
    assert len(notes) == 2 and all("none of the training runs given" in note for note in notes)
    assert not {"robustness.png", "reliability.png"} & {p.name for p in Path("out").glob("*.png")}


def test_report_says_what_is_wrong_with_its_input(logs, tmp_path):
    with pytest.raises(UserError, match="no training runs"):
        build_results([logs / "eval"], tmp_path / "out")
    bad = tmp_path / "runs.json"
    bad.write_text(json.dumps({"runs": []}))
    with pytest.raises(UserError, match=r"is not a runs\.json of this version"):
        build_results([bad], tmp_path / "out")


@pytest.mark.slow  # a script in a subprocess, past its imports (seconds)
def test_report_on_a_broken_runs_json_is_one_error_line(tmp_path):
    bad = tmp_path / "runs.json"
    bad.write_text("{")
    result = run_script("scripts/report.py", str(bad), "--out", str(tmp_path / "out"))
    assert (
        result.returncode == 2 and "error: cannot read" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.slow
def test_results_page_of_real_runs(tiny_mnist, tmp_path):
    """Real runs on the tiny IDX files: a sweep holding pairs out, eval under corruptions, calibrate."""
    sweep = tmp_path / "logs" / "sweep"
    tiny = [
        f"paths.data_dir={tiny_mnist}",
        "data.val_size=50",
        "data.batch_size=25",
        "data.eval_batch_size=60",
    ]
    quiet = ["trainer.enable_progress_bar=false", "extras.print_config=false"]
    result = run_script(
        "scripts/train.py",
        "-m",
        "seed=1,2",
        "data.heldout_pairs=one_per_sum",
        "trainer.max_epochs=2",
        "not_digit_accept=null",  # no detector: the page's "not a digit" is tested with made-up runs
        f"hydra.sweep.dir={sweep}",
        *tiny,
        *quiet,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = json.loads((sweep / "0" / "metrics.json").read_text())["ckpt_path"]
    evals = (("eval", ["robustness=true", "robustness_images=60"]), ("calibrate", ["not_digit_accept=null"]))
    for script, extra in evals:
        run_dir = tmp_path / "logs" / script
        result = run_script(
            f"scripts/{script}.py",
            f"ckpt_path={ckpt}",
            f"paths.data_dir={tiny_mnist}",
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
            *extra,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("scripts/report.py", "logs", "--out", "results", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    text = (tmp_path / "results" / "index.md").read_text()
    # No eval with not_digits=true among these runs: no "not a digit" figure.
    assert {p.name for p in (tmp_path / "results").glob("*.png")} == FIGURES - {"not_digits.png"}
    summary = json.loads((tmp_path / "results" / "runs.json").read_text())
    first = summary["runs"][0]
    assert [epoch for epoch, _ in first["curves"]["val/digit_acc"]] == [1, 2]
    digit = first["metrics"]["test/digit_acc"]
    assert f"| logs/sweep/0 | small | 1 | {100 * digit:.2f} |" in text
    calibration = first["calibration"]["digit"]
    assert sum(calibration["test_reliability_after"]["count"]) == 120  # every test image of tiny MNIST
    result = run_script("scripts/report.py", "results/runs.json", "--out", "again", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "again" / "index.md").read_text() == text
