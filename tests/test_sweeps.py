"""Grid sweeps through Hydra's multirun, their report, and the Optuna search, as a user runs them."""

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from mnist_adder.cli import JobFailed
from mnist_adder.config_checks import check_config
from mnist_adder.errors import UserError
from mnist_adder.reporting.report import build_report
from mnist_adder.training.jobs import JOB_STATUS_FILE, JobStatusCallback
from mnist_adder.training.sweep import optimized_value

from conftest import NO_DETECTOR, compose_config, require_extra

ROOT = Path(__file__).resolve().parents[1]
# A few steps on the tiny IDX files: each run takes seconds, and every output a real run has.
FAST = [
    "data.batch_size=50",
    "data.eval_batch_size=40",
    "trainer.max_epochs=2",
    *NO_DETECTOR,
    "trainer.enable_progress_bar=false",
]
SEARCHED = ("model.optimizer.lr", "data.batch_size", "model.sum_weight", "model.net.backbone.channels")


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def jobs_of(sweep_dir: Path, keys: tuple[str, ...]) -> dict[str, Path]:
    """Job folders by their overrides of `keys`, e.g. {"seed=1 data.val_size=0": <folder>}."""
    jobs = {}
    for job in (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        jobs[" ".join(o for o in overrides if o.split("=", 1)[0] in keys)] = job
    return jobs


@pytest.mark.slow
def test_grid_sweep_runs_every_job_despite_a_failure_and_reports_them(tiny_mnist, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # data.val_size=0 is a user's mistake: those jobs fail, the others still run.
    result = run_script(
        "scripts/train.py",
        "-m",
        "seed=1,2",
        "data.val_size=50,0",
        f"paths.data_dir={tiny_mnist}",
        f"hydra.sweep.dir={sweep_dir}",
        *FAST,
    )
    assert result.returncode == 2, result.stderr[-3000:]  # a user's mistake, as in a single run
    assert "error: data.val_size=0 is not allowed" in result.stderr and "Traceback" not in result.stderr

    jobs = jobs_of(sweep_dir, ("seed", "data.val_size"))
    assert sorted(jobs) == [f"seed={s} data.val_size={v}" for s in (1, 2) for v in (0, 50)]
    metrics = {}
    for name, job in jobs.items():
        status = json.loads((job / JOB_STATUS_FILE).read_text())
        if "val_size=0" in name:
            assert status["status"] == "FAILED" and "data.val_size=0" in status["error"]
            assert not (job / "metrics.json").exists()
        else:
            assert status["status"] == "COMPLETED"
            metrics[name] = json.loads((job / "metrics.json").read_text())
            assert (job / "checkpoints" / "last.ckpt").is_file()

    markdown = run_script("scripts/report.py", str(sweep_dir))
    assert markdown.returncode == 0, markdown.stderr
    rows = {
        line.split("|")[1].strip(): line for line in markdown.stdout.splitlines() if line.startswith("| `")
    }
    assert set(rows) == {"`data.val_size=50`", "`data.val_size=0`"}
    cells = [c.strip() for c in rows["`data.val_size=50`"].split("|")[2:-1]]
    assert cells[:2] == ["2", "1,2"]  # runs, seeds
    for column, key in ((2, "test/digit_acc"), (4, "test/both_acc")):
        values = [100 * m[key] for m in metrics.values()]
        assert cells[column] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    failed_cells = [c.strip() for c in rows["`data.val_size=0`"].split("|")[2:-1]]
    assert failed_cells[0] == "0" and failed_cells[-2:] == ["2", "0"]  # no runs, 2 failed, 0 missing
    assert markdown.stdout.count("failed: data.val_size=0 is not allowed") == 2

    # A run killed before the end leaves no metrics.json and no status: listed as such, not dropped.
    killed = jobs["seed=2 data.val_size=50"]
    (killed / "metrics.json").unlink()
    (killed / JOB_STATUS_FILE).unlink()
    as_csv = run_script("scripts/report.py", str(sweep_dir), "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    table = {row["configuration"]: row for row in csv.DictReader(io.StringIO(as_csv.stdout))}
    done = table["data.val_size=50"]
    assert (done["runs"], done["seeds"], done["no_metrics"]) == ("1", "1", "1")
    assert float(done["test/both_acc_mean"]) == pytest.approx(
        metrics["seed=1 data.val_size=50"]["test/both_acc"]
    )
    assert done["test/both_acc_std"] == ""  # one seed has no spread
    assert table["data.val_size=0"]["failed"] == "2"
    assert f"{killed}" in as_csv.stderr and "no metrics.json" in as_csv.stderr


def test_job_status_tells_a_failed_job_from_a_finished_one_in_the_report(tmp_path):
    # The fast version of the sweep above: the two job folders a sweep would leave, each with the status
    # Hydra's callback writes when its job ends (Hydra's own JobReturn, as the launcher passes it).
    returns = {
        "0": JobReturn(overrides=["seed=1"], status=JobStatus.COMPLETED, _return_value=None),
        "1": JobReturn(
            overrides=["seed=2"],
            status=JobStatus.FAILED,
            _return_value=JobFailed("data.val_size=0 is not allowed: at least 1."),
        ),
    }
    for name, job_return in returns.items():
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- {job_return.overrides[0]}\n")
        JobStatusCallback().on_job_end(
            OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job)}}}), job_return
        )
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"test/digit_acc": 0.99, "seed": 1}))
    assert json.loads((tmp_path / "1" / JOB_STATUS_FILE).read_text()) == {
        "status": "FAILED",
        "error": "data.val_size=0 is not allowed: at least 1.",
        "overrides": ["seed=2"],
    }
    report, _ = build_report([tmp_path])
    assert "2 job(s)" in report and "failed: data.val_size=0 is not allowed" in report


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: folders"),
        (["{tmp}"], "no runs in"),
        (["{tmp}/nowhere"], "is not a folder"),
    ],
)
def test_report_refuses_bad_arguments_clearly(tmp_path, args, message):
    result = run_script("scripts/report.py", *(a.format(tmp=tmp_path) for a in args), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_search_may_only_optimise_a_validation_metric(tmp_path):
    check_config(compose_config(["optimized_metric=best_val/both_acc"], tmp_path))
    check_config(compose_config([], tmp_path))  # null: a plain run optimises nothing
    with pytest.raises(UserError, match="never the test set"):
        check_config(compose_config(["optimized_metric=test/both_acc"], tmp_path))
    assert optimized_value({"best_val/both_acc": 0.5}, "best_val/both_acc") == 0.5
    assert optimized_value({"best_val/both_acc": 0.5}, None) is None
    with pytest.raises(UserError, match="no value"):
        optimized_value({"best_val/both_acc": None}, "best_val/both_acc")


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_reports_the_best_validation_value(tiny_mnist, tmp_path):
    require_extra("hydra_plugins.hydra_optuna_sweeper", "sweep")
    sweep_dir = tmp_path / "search"
    result = run_script(
        "scripts/train.py",
        "-m",
        "hparams_search=small_optuna",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.data_dir={tiny_mnist}",
        "data.val_size=50",
        *(o for o in FAST if not o.startswith("data.batch_size")),  # searched
    )
    assert result.returncode == 0, result.stderr[-3000:]

    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    values, params = [], []
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text())
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(trial / ".hydra" / "overrides.yaml"))
        assert set(SEARCHED) <= set(overrides)
        values.append(metrics["best_val/both_acc"])
        params.append({key: overrides[key] for key in SEARCHED})
    assert len({tuple(p.values()) for p in params}) == 3  # three different trials

    best = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    # The sweeper received each trial's validation score (not a test metric) and kept the highest.
    assert best["best_value"] == pytest.approx(max(values))
    best_trial = params[values.index(max(values))]
    assert {key: str(value).replace(" ", "") for key, value in best["best_params"].items()} == best_trial
