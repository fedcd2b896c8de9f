"""The results page: `python scripts/report.py <run folders...> --out docs/results`.

Two steps, so that the page can be rebuilt from committed data alone (logs/ is not committed):

1. `collect_runs` reads the run folders into one summary, written as `<out>/runs.json`: per training run
   its metrics.json, overrides, config choices and validation curves (from its TensorBoard events), and
   the results of the eval and calibrate runs given beside it that tested one of its checkpoints
   (robustness.json, calibration.json, not_digits.json).
2. `write_results_page` turns that summary, and nothing else, into `<out>/index.md` (the tables of
   `reporting/report.py`) and its matplotlib figures: learning curves, the speed frontier, held-out pairs,
   reliability diagrams before and after calibration, accuracy under corruptions, and "not a digit"
   against its baselines (mean ± std over the runs of a configuration).

`python scripts/report.py <out>/runs.json --out <out>` repeats step 2 and gives the same page.
"""

import json
import math
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from mnist_adder.data.not_digits import NOT_DIGIT_KINDS
from mnist_adder.errors import UserError
from mnist_adder.evaluation.not_digit import METHOD_NAMES
from mnist_adder.render import draw_reliability
from mnist_adder.reporting.curves import epoch_curves
from mnist_adder.reporting.report import (
    RUNS_FILE,
    SUMMARY_FORMAT,
    Group,
    Job,
    find_jobs,
    format_markdown,
    group_jobs,
    load_runs,
    override_key,
    shared_overrides,
    shown_columns,
    summarize,
    summary_jobs,
    task_name,
    unfinished,
)
from mnist_adder.results import write_json_atomic

PAGE_FILE = "index.md"
CURVE_TAGS = ("val/digit_acc", "val/sum_acc", "val/loss", "train/loss")
HEADS = ("digit", "sum")
# Keys of metrics.json, robustness.json and calibration.json that hold a path of this machine: kept
# relative to their run folder (or as a file name), never absolute, in a committed file.
PATH_KEYS = ("ckpt_path", "resumed_from", "calibrated_ckpt_path")
MACHINE_KEYS = ("paths.", "hydra.")
# PNG metadata names the matplotlib version by default: left out, so a page rebuilt elsewhere is the same.
PNG_METADATA = {"Software": None}


def _choices(job_dir: Path) -> dict[str, str]:
    """The config group choices of a job (model=small, trainer=cpu, ...), as Hydra recorded them."""
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.load(hydra_file).hydra.runtime.get("choices", {})
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra")}


def _relative_path(value: Any, run_dir: Path) -> Any:
    """A path of this machine as it reads from its run folder (`checkpoints/epoch_016.ckpt`)."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return path.name


def _portable(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {k: _relative_path(v, run_dir) if k in PATH_KEYS else v for k, v in record.items()}


def _display(path: Path) -> str:
    """A folder as the user would type it: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _owner(ckpt_path: str | None, train_dirs: Sequence[Path]) -> Path | None:
    """The training run folder that holds `ckpt_path`, if one of them does."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path).resolve()
    return next((d for d in train_dirs if d.resolve() in ckpt.parents), None)


def _attachments(jobs: Sequence[Job], train_dirs: Sequence[Path]) -> tuple[dict[Path, dict], list[str]]:
    """Robustness, calibration and not-a-digit results of the eval and calibrate runs, by the training
    run whose checkpoint they tested; and a note for each that tested a checkpoint of no run given."""
    attached: dict[Path, dict[str, Any]] = {}
    notes = []
    for job in jobs:
        task = task_name(job.path)
        found = []
        robustness_file = job.path / "robustness.json"
        if task == "eval" and robustness_file.is_file():
            report = json.loads(robustness_file.read_text())
            if not str(report.get("ckpt_path", "")).endswith(".calibrated.ckpt"):
                found.append(("robustness", report))
        not_digits_file = job.path / "not_digits.json"
        if task == "eval" and not_digits_file.is_file():
            found.append(("not_digits", _not_digits_summary(json.loads(not_digits_file.read_text()))))
        calibration_file = job.path / "calibration.json"
        if task == "calibrate" and calibration_file.is_file():
            found.append(("calibration", json.loads(calibration_file.read_text())))
        for key, report in found:
            owner = _owner(report.get("ckpt_path"), train_dirs)
            if owner is None:
                notes.append(
                    f"{_display(job.path)} ({key}) tested {report.get('ckpt_path')}, a checkpoint of none of "
                    "the training runs given: left out. Pass the training run's folder too."
                )
            else:
                attached.setdefault(owner, {})[key] = _portable(report, owner)
    return attached, notes


# What the page keeps of each method in not_digits.json (scripts/eval.py not_digits=true).
NOT_DIGIT_NUMBERS = (
    "auroc_mnist_test",
    "auroc_photos",
    "threshold",
    "not_digits_refused",
    "mnist_test_accepted",
    "photos_accepted",
    "validation_accepted",
    "refused_by_kind",
    "examples_accepted",
)


def _not_digits_summary(report: dict[str, Any]) -> dict[str, Any]:
    """not_digits.json without what names this machine (the examples' paths, the fonts) or is only
    detail (per letter, per shape): the numbers the page shows."""
    return {
        "ckpt_path": report.get("ckpt_path"),
        "seed": report["seed"],
        "not_digits": report["not_digits"],
        "methods": {
            method: {key: result[key] for key in NOT_DIGIT_NUMBERS}
            for method, result in report["methods"].items()
        },
    }


def collect_runs(
    folders: Sequence[Path], out_dir: Path, group_by: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The summary of every run under `folders` that `write_results_page` draws from, and notes for the
    user (results of eval or calibrate runs that belong to no training run given)."""
    folders = [Path(f) for f in folders]
    jobs = [job for folder in folders for job in find_jobs(folder)]
    train_jobs = [job for job in jobs if task_name(job.path) == "train"]
    if not train_jobs:
        raise UserError(
            f"no training runs in {', '.join(str(f) for f in folders)}: the results page starts from runs "
            "of scripts/train.py (eval and calibrate runs given beside them add robustness and calibration)."
        )
    attached, notes = _attachments([j for j in jobs if j not in train_jobs], [j.path for j in train_jobs])
    runs = []
    for job in train_jobs:
        base = next(f for f in folders if f == job.path or f in job.path.parents)
        event_dir = job.path / "tensorboard"
        run = {
            "name": str(job.path.relative_to(base.parent)) if job.path != base else base.name,
            # Where this machine keeps its data and logs changes no result, and is no one else's path.
            "overrides": [o for o in job.overrides if not override_key(o).startswith(MACHINE_KEYS)],
            "choices": _choices(job.path),
            "status": job.status,
            "error": job.error,
            "metrics": _portable(job.metrics, job.path) if job.metrics is not None else None,
            "curves": epoch_curves(event_dir, CURVE_TAGS) if event_dir.is_dir() else {},
        }
        # A run calibrated by default (calibrate=true) wrote the calibration of its own checkpoint; a
        # calibrate run given beside it (attached below) is newer and wins.
        own_calibration = job.path / "calibration.json"
        if own_calibration.is_file():
            run["calibration"] = _portable(json.loads(own_calibration.read_text()), job.path)
        run |= attached.get(job.path, {})
        runs.append(run)
    out = _display(out_dir)
    sources = " ".join(shlex.quote(_display(f)) for f in folders)
    grouping = f" --group-by {' '.join(group_by)}" if group_by else ""
    summary = {
        "format": SUMMARY_FORMAT,
        "generated_by": f"python scripts/report.py {sources}{grouping} --out {out}",
        "regenerate": f"python scripts/report.py {out}/{RUNS_FILE} --out {out}",
        "group_by": list(group_by or []),
        "runs": runs,
    }
    return summary, notes


def _groups(summary: dict[str, Any]) -> tuple[list[Group], dict[str, dict[str, Any]]]:
    runs_by_name = {run["name"]: run for run in summary["runs"]}
    return group_jobs(summary_jobs(summary), summary["group_by"] or None), runs_by_name


def _save(figure: Figure, out_dir: Path, name: str) -> str:
    figure.savefig(out_dir / name, dpi=100, metadata=PNG_METADATA)
    return name


def _color(k: int) -> Any:
    return f"C{k % 10}"


def learning_curves_figure(groups: Sequence[Group], runs: dict[str, dict[str, Any]]) -> Figure | None:
    """Validation accuracy of both heads and the losses per epoch: per configuration the mean over its
    runs, shaded from the lowest to the highest run."""
    panels = (("val/digit_acc", "validation digit accuracy %"), ("val/sum_acc", "validation sum accuracy %"))
    panels += (("val/loss", "loss (validation solid, training dashed)"),)
    if not any(runs[str(j.path)]["curves"] for g in groups for j in g.completed):
        return None
    figure = Figure(figsize=(13, 4 + _legend_height(len(groups))), layout="constrained")
    axes = figure.subplots(1, 3)
    for k, group in enumerate(groups):
        for ax, (tag, title) in zip(axes, panels, strict=True):
            tags = (tag, "train/loss") if tag == "val/loss" else (tag,)
            for curve_tag, style in zip(tags, ("-", "--"), strict=False):
                epochs, mean, low, high = _mean_curve([runs[str(j.path)] for j in group.completed], curve_tag)
                if not epochs:
                    continue
                scale = 1.0 if "loss" in curve_tag else 100.0
                label = group.label if style == "-" else None
                ax.plot(epochs, scale * mean, style, color=_color(k), label=label, marker=".")
                if len(group.completed) > 1:
                    ax.fill_between(epochs, scale * low, scale * high, color=_color(k), alpha=0.15)
            ax.set(title=title, xlabel="epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(figure, axes[0])
    return figure


def _legend_height(entries: int) -> float:
    """Inches the legend below a figure takes: two columns of entries."""
    return 0.17 * ((entries + 1) // 2) + 0.2


def _legend_below(figure: Figure, ax: Any) -> None:
    # Below the panels, not on one of them: with many configurations a legend inside hides the curves.
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7, frameon=False)


def _mean_curve(runs: Sequence[dict[str, Any]], tag: str) -> tuple[list[int], Any, Any, Any]:
    """Epochs that every run has, and the mean, lowest and highest value of the runs at each."""
    curves = [dict(map(tuple, run["curves"].get(tag, []))) for run in runs]
    if not curves or not all(curves):
        return [], None, None, None
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[e] for e in epochs] for c in curves])
    return epochs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _short_value(key: str, value: str) -> str:
    """A group label's value as a figure shows it: `sum-only` for model.digit_weight=0, `none` for null,
    nothing for a default (the plain case needs no word), else the value itself."""
    if value == "(default)":
        return ""
    if value == "null":
        return "none"
    if key.endswith("digit_weight") and value in ("0", "0.0"):
        return "sum-only"
    return value


def _label_parts(groups: Sequence[Group]) -> tuple[list[str], list[dict[str, str]]]:
    """The keys that differ between the groups' labels (`key=value` words, as --group-by writes them),
    and per group its short value of each (`_short_value`)."""
    parsed = [dict(w.split("=", 1) if "=" in w else (w, w) for w in g.label.split(" ")) for g in groups]
    keys = [k for k in dict.fromkeys(k for p in parsed for k in p) if len({p.get(k) for p in parsed}) > 1]
    return keys, [{k: _short_value(k, p.get(k, "(default)")) for k in keys} for p in parsed]


def _panel_layout(groups: Sequence[Group]) -> tuple[list[str], list[str], list[tuple[str, list[int]]]]:
    """Small multiples from the labels: (column names, row names, per group ((row, column) of its panel,
    its index, its name in the panel)). The first differing key makes the columns, a third one the rows;
    the rest names the group inside its panel."""
    keys, shorts = _label_parts(groups)
    col_key = keys[0] if len(keys) >= 2 else None
    row_key = keys[-1] if len(keys) >= 3 else None
    columns = list(dict.fromkeys(s[col_key] for s in shorts)) if col_key else [""]
    rows = list(dict.fromkeys(s[row_key] for s in shorts)) if row_key else [""]
    inner = [k for k in keys if k not in (col_key, row_key)]
    cells = []
    for k, short in enumerate(shorts):
        cell = (short[row_key] if row_key else "", short[col_key] if col_key else "")
        cells.append((cell, k, ", ".join(v for key in inner if (v := short[key])) or "default"))
    return columns, rows, cells


def _row_title(row: str) -> str:
    return row or "both losses"


def speed_figure(groups: Sequence[Group]) -> Figure | None:
    """Test digit and sum accuracy against fit seconds: one panel per head and configuration column, every
    run a dot coloured by the rest of its configuration, and each configuration's mean a ring."""
    points = [(k, g, j) for k, g in enumerate(groups) for j in g.completed if j.metrics.get("fit_seconds")]
    if not points:
        return None
    keys, shorts = _label_parts(groups)
    col_key = keys[0] if len(keys) >= 2 else None
    colour_key = keys[1] if len(keys) >= 2 else (keys[0] if keys else None)
    marker_key = keys[2] if len(keys) >= 3 else None
    columns = list(dict.fromkeys(s[col_key] for s in shorts)) if col_key else [""]
    colours = list(dict.fromkeys(s[colour_key] for s in shorts)) if colour_key else [""]
    markers = list(dict.fromkeys(s[marker_key] for s in shorts)) if marker_key else [""]
    figure = Figure(figsize=(3.2 * len(columns) + 1, 6.2), layout="constrained")
    axes = figure.subplots(len(HEADS), len(columns), sharex=True, sharey="row", squeeze=False)
    for k, short in enumerate(shorts):
        runs = [j for kk, _, j in points if kk == k]
        if not runs:
            continue
        c = columns.index(short[col_key]) if col_key else 0
        colour = _color(colours.index(short[colour_key]) if colour_key else 0)
        marker = "os^Dv"[markers.index(short[marker_key]) % 5] if marker_key else "o"
        x = [j.metrics["fit_seconds"] for j in runs]
        for r, head in enumerate(HEADS):
            y = [100 * j.metrics[f"test/{head}_acc"] for j in runs]
            ax = axes[r, c]
            ax.scatter(x, y, s=12, color=colour, marker=marker, alpha=0.6)
            ax.scatter(np.mean(x), np.mean(y), s=90, facecolors="none", edgecolors=colour, marker=marker)
    for c, column in enumerate(columns):
        axes[0, c].set_title(column or "all runs", fontsize=10)
        axes[-1, c].set_xlabel("fit seconds")
        for r, head in enumerate(HEADS):
            axes[r, c].grid(alpha=0.3)
            if c == 0:
                axes[r, c].set_ylabel(f"test {head} accuracy %")
    handles = [
        Line2D([], [], color=_color(i), marker="o", ls="", label=v or "default")
        for i, v in enumerate(colours)
    ]
    if marker_key:
        handles += [
            Line2D([], [], color="0.3", marker="os^Dv"[i % 5], ls="", label=_row_title(v))
            for i, v in enumerate(markers)
        ]
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False
    )
    return figure


def heldout_figure(groups: Sequence[Group]) -> Figure | None:
    """Sum accuracy on the test pairs training saw against those it never saw: small multiples, one panel
    per configuration column and row, a pair of bars (seen, held out) per configuration in it."""
    keys = ("test/sum_acc_seen_pairs", "test/sum_acc_unseen_pairs")
    values: dict[int, list[list[float]]] = {}
    for k, group in enumerate(groups):
        runs = [
            [100 * j.metrics[key] for j in group.completed if j.metrics.get(key) is not None] for key in keys
        ]
        if all(runs):
            values[k] = runs
    if not values:
        return None
    columns, rows, cells = _panel_layout(groups)
    figure = Figure(figsize=(3.2 * len(columns) + 1, 2.6 * len(rows) + 0.8), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), sharey=True, squeeze=False)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            inside = [(k, name) for (cell, k, name) in cells if cell == (row, column) and k in values]
            x = np.arange(len(inside))
            for offset, index, name in ((-0.2, 0, "seen pairs"), (0.2, 1, "held-out pairs")):
                means = [np.mean(values[k][index]) for k, _ in inside]
                errors = [
                    np.std(values[k][index], ddof=1) if len(values[k][index]) > 1 else 0 for k, _ in inside
                ]
                ax.bar(x + offset, means, 0.4, yerr=errors, capsize=2, color=_color(index), label=name)
            ax.set_xticks(x, [name for _, name in inside], fontsize=8, rotation=30, ha="right")
            ax.set(ylim=(0, 100))
            ax.grid(axis="y", alpha=0.3)
            title = ", ".join(t for t in (column, _row_title(row) if len(rows) > 1 else "") if t)
            ax.set_title(title or "all runs", fontsize=10)
            if c == 0:
                ax.set_ylabel("test sum accuracy %")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def _first_per_group(groups: Sequence[Group], runs: dict[str, dict[str, Any]], key: str) -> list[tuple]:
    """(configuration, run) for the first run of each configuration that has `key` (robustness, ...)."""
    picked = []
    for group in groups:
        run = next((runs[str(j.path)] for j in group.completed if runs[str(j.path)].get(key)), None)
        if run is not None:
            picked.append((group.label, run))
    return picked


def reliability_figure(picked: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """Per run, the reliability diagram of each head before and after temperature scaling."""
    figure = Figure(figsize=(16, 5.4 * len(picked)), layout="constrained")
    for row, (label, run) in zip(np.atleast_1d(figure.subfigures(len(picked), 1)), picked, strict=True):
        row.suptitle(f"{label} ({run['name']})", fontsize=9, x=0.01, ha="left")
        grid = row.add_gridspec(2, 4, height_ratios=(4, 1))
        for c, (head, when) in enumerate((h, w) for h in HEADS for w in ("before", "after")):
            axes = row.add_subplot(grid[0, c])
            histogram = row.add_subplot(grid[1, c], sharex=axes)
            part = run["calibration"][head]
            temperature = 1.0 if when == "before" else part["temperature"]
            title = f"{head} head, {when} (T = {temperature:.3g}): ECE {part[f'test_ece_{when}']:.4f}"
            draw_reliability(axes, histogram, part[f"test_reliability_{when}"], title)
    return figure


def robustness_figure(picked: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """Digit accuracy against corruption severity (0: clean), one line per corruption, one panel per run."""
    figure = Figure(figsize=(5.5 * len(picked) + 1.5, 4.5), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(picked), sharey=True))
    for ax, (label, run) in zip(axes, picked, strict=True):
        rows = run["robustness"]["results"]
        clean = next(row for row in rows if row["corruption"] == "none")
        names = list(dict.fromkeys(row["corruption"] for row in rows if row["corruption"] != "none"))
        for k, name in enumerate(names):
            severities = sorted((r for r in rows if r["corruption"] == name), key=lambda r: r["severity"])
            points = [clean, *severities]
            ax.plot(
                [p["severity"] for p in points],
                [100 * p["digit_acc"] for p in points],
                marker="o",
                color=_color(k),
                linestyle="-" if k < 10 else "--",
                label=name,
            )
        ax.set_title(f"{label}\n({run['name']}, {run['robustness']['images']} test images)", fontsize=8)
        ax.set(xlabel="severity (0: clean)", xticks=[0, 1, 2, 3], ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test digit accuracy %")
    axes[-1].legend(fontsize=7, loc="lower left")
    return figure


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _robustness_table(picked: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Every corruption and severity, digit and sum accuracy of each run side by side."""
    header = ["corruption", "severity", "level"]
    for _, run in picked:
        header += [f"digit % ({run['name']})", f"sum % ({run['name']})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = picked[0][1]["robustness"]["results"]
    for row in first:
        cells = [f"`{row['corruption']}`", str(row["severity"]), f"{row['level']:g} {row['unit']}".strip()]
        for _, run in picked:
            match = next(
                (
                    r
                    for r in run["robustness"]["results"]
                    if (r["corruption"], r["severity"]) == (row["corruption"], row["severity"])
                ),
                None,
            )
            cells += [_percent(match and match["digit_acc"]), _percent(match and match["sum_acc"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _calibration_table(picked: Sequence[tuple[str, dict[str, Any]]]) -> str:
    header = "| configuration | run | head | T | val NLL before | after | test ECE before | after |"
    lines = [header, "|" + "---|" * 8]
    for label, run in picked:
        for head in HEADS:
            p = run["calibration"][head]
            lines.append(
                f"| `{label}` | {run['name']} | {head} | {p['temperature']:.4f} | "
                f"{p['val_nll_before']:.4f} | {p['val_nll_after']:.4f} | "
                f"{p['test_ece_before']:.4f} | {p['test_ece_after']:.4f} |"
            )
    return "\n".join(lines)


def _runs_with(group: Group, runs: dict[str, dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [runs[str(j.path)] for j in group.completed if runs[str(j.path)].get(key)]


def _mean_std_cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _in_order(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """`names` in the order of `order` (JSON files are written with sorted keys), unknown ones last."""
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _not_digit_table(groups: Sequence[Group], runs: dict[str, dict[str, Any]]) -> str:
    """Per configuration and method: mean ± std over its runs measured with not_digits=true."""
    header = (
        "| configuration | runs | method | AUROC vs MNIST test | AUROC vs photos | not-digits refused % | "
        "MNIST test accepted % | photos accepted % | examples accepted (worst run) |"
    )
    lines = [header, "|" + "---|" * 9]
    for group in groups:
        measured = _runs_with(group, runs, "not_digits")
        if not measured:
            continue
        for method in _in_order(measured[0]["not_digits"]["methods"], list(METHOD_NAMES)):
            results = [run["not_digits"]["methods"][method] for run in measured]
            examples = [sum(r["examples_accepted"].values()) for r in results]
            total = len(results[0]["examples_accepted"])
            accepted = f"{min(examples)}/{total}"
            cells = [
                f"`{group.label}`",
                str(len(measured)),
                METHOD_NAMES.get(method, method),
                _mean_std_cell([r["auroc_mnist_test"] for r in results], 1.0, 4),
                _mean_std_cell([r["auroc_photos"] for r in results], 1.0, 4),
                _mean_std_cell([r["not_digits_refused"] for r in results]),
                _mean_std_cell([r["mnist_test_accepted"] for r in results]),
                _mean_std_cell([r["photos_accepted"] for r in results]),
                accepted,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_digit_figure(groups: Sequence[Group], runs: dict[str, dict[str, Any]]) -> Figure | None:
    """Per configuration, the share of each kind of not-digit each method refuses (mean over runs, the
    bar; std, the whisker)."""
    measured = [(g.label, m) for g in groups if (m := _runs_with(g, runs, "not_digits"))]
    if not measured:
        return None
    figure = Figure(figsize=(6.5 * len(measured) + 1, 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(measured), sharey=True))
    for ax, (label, group_runs) in zip(axes, measured, strict=True):
        methods = _in_order(group_runs[0]["not_digits"]["methods"], list(METHOD_NAMES))
        kinds = _in_order(group_runs[0]["not_digits"]["not_digits"], NOT_DIGIT_KINDS)
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            shares = np.array(
                [
                    [100 * run["not_digits"]["methods"][method]["refused_by_kind"][kind] for kind in kinds]
                    for run in group_runs
                ]
            )
            ax.bar(
                np.arange(len(kinds)) + (k - (len(methods) - 1) / 2) * width,
                shares.mean(axis=0),
                width,
                yerr=shares.std(axis=0, ddof=1) if len(group_runs) > 1 else None,
                color=_color(k),
                label=METHOD_NAMES.get(method, method),
            )
        ax.set_xticks(np.arange(len(kinds)), [kind.replace("_", " ") for kind in kinds], fontsize=8)
        ax.set(ylim=(0, 100))
        ax.set_title(f"{label} ({len(group_runs)} runs)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("not-digits refused %")
    _legend_below(figure, axes[0])
    return figure


def _runs_table(summary: dict[str, Any]) -> str:
    """Every run: its folder, config choices that differ from the defaults, seed and test accuracies."""
    lines = ["| run | model | seed | digit acc % | sum acc % | fit s | epochs |", "|" + "---|" * 7]
    for run in summary["runs"]:
        metrics = run["metrics"] or {}
        epochs = len(run["curves"].get("val/digit_acc", []))
        fit = metrics.get("fit_seconds")
        lines.append(
            f"| {run['name']} | {run['choices'].get('model', '-')} | {metrics.get('seed', '-')} | "
            f"{_percent(metrics.get('test/digit_acc'))} | {_percent(metrics.get('test/sum_acc'))} | "
            f"{'-' if fit is None else f'{fit:.1f}'} | {epochs or '-'} |"
        )
    return "\n".join(lines)


def write_results_page(summary: dict[str, Any], out_dir: Path) -> Path:
    """`<out_dir>/index.md` and its figures, from `summary` alone; returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a figure whose data is gone must not stay on the page's folder
        old.unlink()
    groups, runs = _groups(summary)
    jobs = summary_jobs(summary)
    parts = [
        "# Results",
        "",
        "<!-- Written by scripts/report.py: do not edit by hand, regenerate it (commands below). -->",
        "",
        f"Every number and figure on this page was written by `{summary['generated_by']}` from "
        f"{len(jobs)} training run(s). What it read is kept in [`runs.json`]({RUNS_FILE}) beside this page "
        "(each run's `metrics.json`, overrides, config choices and validation curves, and the robustness, "
        "calibration and not-a-digit results of its checkpoints), and the page is rebuilt from that file "
        "alone with",
        "",
        # tests/test_readme.py runs this command itself, against the committed page.
        "<!-- docs-test: skip (tests/test_readme.py rebuilds this page from runs.json and compares) -->",
        "```bash",
        summary["regenerate"],
        "```",
        "",
        "## Test accuracy",
        "",
        "Mean ± sample standard deviation over the seeds of each configuration (MNIST test set, the fixed "
        "test pairs; the checkpoint chosen on validation).",
    ]
    shared = shared_overrides(jobs)
    if shared and not summary["group_by"]:
        parts += ["", f"Shared by all runs: `{' '.join(shared)}`."]
    columns = shown_columns(jobs)
    parts += ["", format_markdown([summarize(g, columns) for g in groups], columns)]
    problems = unfinished(jobs)
    if problems:
        parts += ["", f"Runs without results ({len(problems)}):", "", *problems]
    parts += ["", "Every run:", "", _runs_table(summary)]

    sections = []
    if (figure := learning_curves_figure(groups, runs)) is not None:
        sections.append(("Learning curves", _save(figure, out_dir, "learning_curves.png"), ""))
    if (figure := speed_figure(groups)) is not None:
        text = (
            "Test accuracy against `fit_seconds` (the fit alone, as the run's Timer measured it): a panel "
            "per head and configuration column, every run a dot, each configuration's mean a larger mark."
        )
        sections.append(("Accuracy against training time", _save(figure, out_dir, "speed.png"), text))
    if (figure := heldout_figure(groups)) is not None:
        text = (
            "Runs with `data.heldout_pairs`: the sum accuracy on test samples whose (digit, number) pair "
            "training saw and on those it never saw (mean and standard deviation over seeds), a panel per "
            "configuration column and row."
        )
        sections.append(("Held-out pairs", _save(figure, out_dir, "heldout_pairs.png"), text))
    if picked := _first_per_group(groups, runs, "calibration"):
        text = (
            "From `scripts/calibrate.py` on the first run of each configuration: temperatures fitted on "
            "the validation split, the test set's reliability before and after.\n\n"
            + _calibration_table(picked)
        )
        sections.append(("Calibration", _save(reliability_figure(picked), out_dir, "reliability.png"), text))
    if picked := _first_per_group(groups, runs, "robustness"):
        text = (
            "From `scripts/eval.py robustness=true` on the first run of each configuration.\n\n"
            + _robustness_table(picked)
        )
        sections.append(("Robustness", _save(robustness_figure(picked), out_dir, "robustness.png"), text))
    if (figure := not_digit_figure(groups, runs)) is not None:
        text = (
            "From `scripts/eval.py not_digits=true` on the runs' checkpoints (docs/not_a_digit.md): the "
            "detector stored in each checkpoint and the baselines, each baseline's threshold accepting the "
            "share of validation digits the detector's accepts; mean ± std over the runs measured.\n\n"
            + _not_digit_table(groups, runs)
        )
        sections.append(("Not a digit", _save(figure, out_dir, "not_digits.png"), text))
    for title, image, text in sections:
        parts += ["", f"## {title}", "", f"![{title}]({image})"]
        if text:
            parts += ["", text]
    page = out_dir / PAGE_FILE
    page.write_text("\n".join(parts) + "\n")
    return page


def build_results(
    inputs: Sequence[Path], out_dir: Path, group_by: Sequence[str] | None = None
) -> tuple[Path, list[str]]:
    """The results page from run folders (writing `<out_dir>/runs.json` first) or from one runs.json."""
    out_dir = Path(out_dir)
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        if group_by:
            raise UserError(
                "--group-by applies to run folders; a runs.json keeps the grouping it was written with."
            )
        summary, notes = load_runs(Path(inputs[0])), []
    else:
        summary, notes = collect_runs(inputs, out_dir, group_by)
        # Through JSON and back: the page drawn now is the one runs.json alone gives.
        summary = json.loads(json.dumps(summary))
    runs_file = out_dir / RUNS_FILE
    if not (runs_file.is_file() and Path(inputs[0]).resolve() == runs_file.resolve()):
        write_json_atomic(runs_file, summary)
    return write_results_page(summary, out_dir), notes
