"""Sweep results as one table: per configuration, mean and std over seeds (scripts/report.py).

A job is a folder with `.hydra/overrides.yaml` (Hydra writes it when the job starts). Its configuration is
its overrides less `seed=...` (or, with --group-by, the values of the keys named). A job counts in the
means when it has metrics.json and did not fail; the others are listed with what went wrong.
"""

import argparse
import csv
import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mnist_adder.errors import UserError
from mnist_adder.training.jobs import read_job_status

Column = tuple[str, str, bool]
# (metrics.json key, column title, shown in percent)
COLUMNS: tuple[Column, ...] = (
    ("test/digit_acc", "digit acc %", True),
    ("test/sum_acc", "sum acc %", True),
    ("test/both_acc", "both acc %", True),
    ("test/sum_given_digit_acc", "sum given digit %", True),
    ("test/sum_acc_seen_pairs", "sum seen pairs %", True),
    ("test/sum_acc_unseen_pairs", "sum unseen pairs %", True),
    ("test/sum_acc_unseen_sums", "sum unseen sums %", True),
    # MNIST addition (data=mnist_addition): the most probable sum; digit acc^(2N), the ceiling of sum acc.
    ("test/sum_acc_map", "sum MAP %", True),
    ("test/sum_acc_ceiling", "digit acc^2N %", True),
    # Mean |P(sum = s) - P(digit = s - n)| at the predicted sum, in percentage points.
    ("test/sum_coherence_gap", "coherence gap %", True),
    # Expected calibration error of the model handed over, and of the raw one (calibrate=true keeps both).
    ("test/digit_ece", "digit ECE %", True),
    ("test/sum_ece", "sum ECE %", True),
    ("test/digit_ece_uncalibrated", "digit ECE raw %", True),
    ("test/sum_ece_uncalibrated", "sum ECE raw %", True),
    ("num_parameters", "parameters", False),
    ("fit_seconds", "fit s", False),
)
# Only runs with data.heldout_pairs (unseen sums: that hold out every pair of a sum) have the first three;
# runs from before the coherence metric, the ECE or calibration by default lack the others. Each is shown
# when some job has it, never as a column of "-".
OPTIONAL_KEYS = frozenset(
    {
        "test/sum_acc_seen_pairs",
        "test/sum_acc_unseen_pairs",
        "test/sum_acc_unseen_sums",
        "test/sum_acc_map",
        "test/sum_acc_ceiling",
        # MNIST addition has no (digit, sum) pair per sample: neither of these.
        "test/both_acc",
        "test/sum_given_digit_acc",
        "test/sum_coherence_gap",
        "test/digit_ece",
        "test/sum_ece",
        "test/digit_ece_uncalibrated",
        "test/sum_ece_uncalibrated",
    }
)
SEED_KEY = "seed"
MISSING = "no metrics.json"
# The summary of runs that `scripts/report.py ... --out <dir>` writes (reporting/results_page.py) and
# reads back in place of the run folders.
RUNS_FILE = "runs.json"
SUMMARY_FORMAT = 1


@dataclass
class Job:
    path: Path
    overrides: list[str]
    metrics: dict[str, Any] | None
    status: str  # "completed", "failed" or MISSING
    error: str | None = None

    @property
    def seed(self) -> str | None:
        # metrics.json has the seed the run used, also when it was the config's default.
        if self.metrics is not None and self.metrics.get(SEED_KEY) is not None:
            return str(self.metrics[SEED_KEY])
        return override_dict(self.overrides).get(SEED_KEY)


@dataclass
class Group:
    label: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def completed(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "completed"]


def override_key(override: str) -> str:
    """`model.optimizer.lr` of `model.optimizer.lr=0.01` (also of `+key=...`, `++key=...`, `~key`)."""
    return override.split("=", 1)[0].lstrip("+~")


def override_dict(overrides: Sequence[str]) -> dict[str, str]:
    return {override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in overrides}


def _job_order(path: Path) -> tuple[Any, ...]:
    # Multirun job folders are numbered: 2 before 10.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def read_job(job_dir: Path) -> Job:
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    status = read_job_status(job_dir)
    metrics_path = job_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if status is not None and status.get("status") == "FAILED":
        return Job(job_dir, overrides, None, "failed", status.get("error"))
    if metrics is None:
        return Job(job_dir, overrides, None, MISSING)
    return Job(job_dir, overrides, metrics, "completed")


def task_name(job_dir: Path) -> str:
    """`train`, `eval`, `calibrate`, ... from the job's stored config (train for a config without one)."""
    config = job_dir / ".hydra" / "config.yaml"
    return str(OmegaConf.load(config).get("task_name", "train")) if config.is_file() else "train"


def load_runs(path: Path) -> dict[str, Any]:
    """A summary written by `collect_runs` (`runs.json`)."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read {path}: {err}. Give a runs.json written by scripts/report.py --out."
        ) from err
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT or "runs" not in summary:
        raise UserError(
            f"{path} is not a runs.json of this version of scripts/report.py (format {SUMMARY_FORMAT}); "
            "write it again from the run folders: python scripts/report.py <run folders...> --out <dir>."
        )
    return summary


def summary_jobs(summary: dict[str, Any]) -> list[Job]:
    """The runs of a summary as the report's jobs, so the tables group and average them as for folders."""
    return [
        Job(Path(r["name"]), r["overrides"], r["metrics"], r["status"], r["error"]) for r in summary["runs"]
    ]


def find_jobs(folder: Path) -> list[Job]:
    """Every job under `folder` (a multirun folder, a single run, or a folder of either)."""
    if not folder.is_dir():
        raise UserError(
            f"{folder} is not a folder: pass a multirun folder such as logs/train/multiruns/<date_time>."
        )
    job_dirs = sorted({p.parent.parent for p in folder.glob("**/.hydra/overrides.yaml")}, key=_job_order)
    if not job_dirs:
        raise UserError(
            f"no runs in {folder}: a run folder holds .hydra/overrides.yaml. Pass the folder of a sweep "
            "(python scripts/train.py -m ... writes logs/train/multiruns/<date_time>/<n>/) or of a run."
        )
    return [read_job(job_dir) for job_dir in job_dirs]


def group_jobs(jobs: Sequence[Job], group_by: Sequence[str] | None = None) -> list[Group]:
    """Groups in order of first appearance. Default: by all overrides but seed; else by the keys named."""
    if group_by:
        known = {override_key(o) for job in jobs for o in job.overrides}
        unknown = [key for key in group_by if key not in known]
        if unknown:
            raise UserError(
                f"--group-by {' '.join(unknown)}: no job overrides that; the overridden keys are "
                f"{', '.join(sorted(known)) or '(none)'}."
            )

        def key_of(job: Job) -> tuple[str, ...]:
            values = override_dict(job.overrides)
            return tuple(f"{key}={values.get(key, '(default)')}" for key in group_by)

    else:
        # Overrides every job shares say nothing about the difference between configurations.
        shared = set.intersection(*(set(job.overrides) for job in jobs))

        def key_of(job: Job) -> tuple[str, ...]:
            return tuple(o for o in job.overrides if override_key(o) != SEED_KEY and o not in shared)

    unnamed = "(shared overrides)" if shared_overrides(jobs) else "(defaults)"
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        key = key_of(job)
        groups.setdefault(key, Group(" ".join(key) or unnamed)).jobs.append(job)
    return list(groups.values())


def shared_overrides(jobs: Sequence[Job]) -> list[str]:
    """The overrides (seed aside) that every job has, in the first job's order."""
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    return [o for o in jobs[0].overrides if o in shared and override_key(o) != SEED_KEY]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std needs two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def shown_columns(jobs: Sequence[Job]) -> tuple[Column, ...]:
    """COLUMNS without the optional ones that no job's metrics.json has."""
    present = {key for job in jobs if job.metrics is not None for key in job.metrics}
    return tuple(column for column in COLUMNS if column[0] not in OPTIONAL_KEYS or column[0] in present)


def summarize(group: Group, columns: Sequence[Column] = COLUMNS) -> dict[str, Any]:
    """One row: runs, seeds, failed/missing counts, and (mean, std) per column."""
    done = group.completed
    row: dict[str, Any] = {
        "configuration": group.label,
        "runs": len(done),
        "seeds": [job.seed or "-" for job in done],
        "failed": sum(job.status == "failed" for job in group.jobs),
        "missing": sum(job.status == MISSING for job in group.jobs),
    }
    for key, _, _ in columns:
        values = [float(job.metrics[key]) for job in done if job.metrics.get(key) is not None]
        row[key] = mean_std(values)
    return row


def _cell(stats: tuple[float | None, float | None], percent: bool, key: str) -> str:
    mean, std = stats
    if mean is None:
        return "-"
    scale, fmt = (100.0, "{:.2f}") if percent else (1.0, "{:,.0f}" if key == "num_parameters" else "{:.1f}")
    text = fmt.format(scale * mean)
    # Every seed of a configuration has the same parameter count: no column of "± 0" for it.
    if std is None or (key == "num_parameters" and std == 0):
        return text
    return f"{text} ± {fmt.format(scale * std)}"


def format_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[Column] = COLUMNS) -> str:
    header = ["configuration", "runs", "seeds", *(title for _, title, _ in columns), "failed", "no metrics"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"`{row['configuration']}`",
            str(row["runs"]),
            ",".join(row["seeds"]) or "-",
            *(_cell(row[key], percent, key) for key, _, percent in columns),
            str(row["failed"]),
            str(row["missing"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(rows: Sequence[dict[str, Any]], columns: Sequence[Column] = COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    stat_columns = [f"{key}_{stat}" for key, _, _ in columns for stat in ("mean", "std")]
    writer.writerow(["configuration", "runs", "seeds", *stat_columns, "failed", "no_metrics"])
    for row in rows:
        stats = [("" if v is None else v) for key, _, _ in columns for v in row[key]]
        writer.writerow(
            [row["configuration"], row["runs"], " ".join(row["seeds"]), *stats, row["failed"], row["missing"]]
        )
    return out.getvalue().rstrip("\n")


def unfinished(jobs: Sequence[Job]) -> list[str]:
    """One line per job that did not finish: its folder, overrides and what went wrong."""
    lines = []
    for job in jobs:
        if job.status == "completed":
            continue
        why = (
            f"failed: {job.error}"
            if job.status == "failed"
            else f"{MISSING} (still running, killed, or crashed)"
        )
        lines.append(f"- {job.path} [{' '.join(job.overrides)}]: {why}")
    return lines


def search_results(folder: Path) -> str | None:
    """The Optuna sweeper's summary of a search folder, if it is one."""
    path = folder / "optimization_results.yaml"
    if not path.is_file():
        return None
    results = OmegaConf.to_container(OmegaConf.load(path))
    params = " ".join(f"{k}={v}" for k, v in results.get("best_params", {}).items())
    return f"search {folder}: best value {results.get('best_value')} with {params}"


def build_report(
    folders: Sequence[Path], fmt: str = "markdown", group_by: Sequence[str] | None = None
) -> tuple[str, str]:
    """(report for stdout, notes for stderr): the table, and in markdown the context around it."""
    if len(folders) == 1 and Path(folders[0]).is_file():
        summary = load_runs(Path(folders[0]))
        jobs, group_by = summary_jobs(summary), group_by or summary["group_by"]
    else:
        # eval and calibrate runs given beside the training runs add to the results page, not the table.
        jobs = [
            job for folder in folders for job in find_jobs(Path(folder)) if task_name(job.path) == "train"
        ]
        if not jobs:
            raise UserError(f"no training runs in {', '.join(str(f) for f in folders)}.")
    columns = shown_columns(jobs)
    rows = [summarize(group, columns) for group in group_jobs(jobs, group_by)]
    problems = unfinished(jobs)
    if fmt == "csv":
        # stdout stays a clean CSV; what a reader must still know goes to stderr.
        notes = [f"{len(problems)} job(s) without results:", *problems] if problems else []
        return format_csv(rows, columns), "\n".join(notes)
    parts = [f"Runs in {', '.join(str(f) for f in folders)}: {len(jobs)} job(s)."]
    shared = shared_overrides(jobs)
    if shared and not group_by:
        parts.append(f"Shared by all: `{' '.join(shared)}`.")
    parts.append("Test metrics from each run's metrics.json; mean ± std over seeds (sample std).\n")
    parts.append(format_markdown(rows, columns))
    if problems:
        parts.append(f"\nJobs without results ({len(problems)}):")
        parts.extend(problems)
    parts.extend(line for folder in folders if (line := search_results(Path(folder))))
    return "\n".join(parts), ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/report.py",
        description="Mean and std over seeds of every configuration in one or more sweep folders.",
    )
    parser.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help="multirun or run folders (logs/train/multiruns/<date_time>), or one runs.json written by --out",
    )
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="table format")
    parser.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        help="group by these override keys only (e.g. model); default: every override but seed",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write the results page there: index.md, its figures, and runs.json (what was read, from "
        "which the page can be written again: scripts/report.py DIR/runs.json --out DIR)",
    )
    return parser.parse_args(argv)
