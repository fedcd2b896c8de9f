"""What scripts/gpu_check.sh measured, gathered into one JSON file and one small archive.

python -m mnist_adder.tools.gpu_check <out> [--dry-run=true]: reads the stages the script recorded
(<out>/stages.tsv: name, exit status, seconds, command), the benchmark's JSON lines in each bench_* log,
the runs' metrics.json and the profiler's table; writes <out>/gpu_check.json, then <out>/gpu_check.tar.gz
with that file, the logs, the metrics.json files and the profiler's output (no checkpoints, no
TensorBoard events), so the whole result comes back from a borrowed machine as two files.
"""

import argparse
import json
import statistics
import tarfile
from pathlib import Path
from typing import Any

# Issue 25's targets on one H200, checked against what was measured (None: not measured).
MIN_RATIO = 0.90
MIN_IMAGES_PER_S = 1_000_000  # at batch >= 1024
FAST_GPU_FLOOR = (0.990, 0.989)  # test digit, sum accuracy (mean of 3 seeds)
FAST_GPU_MAX_FIT_S = 0.5
TRAIN_GPU_FLOOR = (0.9955, 0.9955)
TRAIN_GPU_MAX_FIT_S = 15.0
# What goes into the archive, and the largest file it takes (a Chrome trace of a few steps is far smaller).
ARCHIVED = ("*.log", "stages.tsv", "gpu_check.json", "**/metrics.json", "**/*profiler*.txt")
ARCHIVED += ("**/*.pt.trace.json",)  # the profiler's Chrome trace
MAX_ARCHIVED_BYTES = 20_000_000


def read_stages(out: Path) -> list[dict[str, Any]]:
    """The rows of <out>/stages.tsv: name, rc (124: timed out), seconds, command."""
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, rc, seconds, command = line.split("\t", 3)
        rows.append({"name": name, "rc": int(rc), "seconds": float(seconds), "command": command})
    return rows


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    keys = ("test/digit_acc", "test/sum_acc", "fit_seconds", "precision", "seed")
    return {key: m.get(key) for key in keys}


def _series(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the runs of each accuracy and the fit time."""
    summary: dict[str, Any] = {"runs": runs}
    for key in ("test/digit_acc", "test/sum_acc", "fit_seconds"):
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            summary[f"{key}_mean"] = statistics.mean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def benchmarks(out: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark stage bench_<mode>_b<batch>: its JSON line, mode and batch size."""
    rows = []
    for stage in stages:
        if not stage["name"].startswith("bench_"):
            continue
        _, mode, batch = stage["name"].split("_")
        row: dict[str, Any] = {"mode": mode, "batch_size": int(batch.removeprefix("b")), "rc": stage["rc"]}
        lines = _json_lines(out / f"{stage['name']}.log")
        if lines:
            row |= lines[0]
        rows.append(row)
    return rows


def _met(value: float | None, ok: bool) -> bool | None:
    return None if value is None else ok


def targets(bench: list[dict[str, Any]], fast: dict[str, Any], train_gpu: dict[str, Any] | None) -> dict:
    """Each of issue 25's targets: the measured value and whether it is met (None: not measured)."""
    ratios = [r["ratio"] for r in bench if "ratio" in r]
    large = [r["project_img_s"] for r in bench if "project_img_s" in r and r["batch_size"] >= 1024]
    fast_acc = (fast.get("test/digit_acc_mean"), fast.get("test/sum_acc_mean"))
    fast_fit = fast.get("fit_seconds_mean")
    result: dict[str, Any] = {
        "ratio_min": {"value": min(ratios, default=None), "target": f">= {MIN_RATIO}"},
        "img_s_batch_1024_up_max": {"value": max(large, default=None), "target": f">= {MIN_IMAGES_PER_S}"},
        "fast_gpu": {
            "value": {"digit": fast_acc[0], "sum": fast_acc[1], "fit_seconds": fast_fit},
            "target": f">= {FAST_GPU_FLOOR} in <= {FAST_GPU_MAX_FIT_S} s",
        },
    }
    result["ratio_min"]["met"] = _met(result["ratio_min"]["value"], min(ratios, default=0) >= MIN_RATIO)
    result["img_s_batch_1024_up_max"]["met"] = _met(
        result["img_s_batch_1024_up_max"]["value"], max(large, default=0) >= MIN_IMAGES_PER_S
    )
    fast_met = None
    if None not in (*fast_acc, fast_fit):
        fast_met = fast_acc[0] >= FAST_GPU_FLOOR[0] and fast_acc[1] >= FAST_GPU_FLOOR[1]
        fast_met = fast_met and fast_fit <= FAST_GPU_MAX_FIT_S
    result["fast_gpu"]["met"] = fast_met
    train = train_gpu or {}
    acc = (train.get("test/digit_acc"), train.get("test/sum_acc"), train.get("fit_seconds"))
    result["train_gpu"] = {
        "value": {"digit": acc[0], "sum": acc[1], "fit_seconds": acc[2]},
        "target": f">= {TRAIN_GPU_FLOOR} in <= {TRAIN_GPU_MAX_FIT_S} s",
        "met": acc[0] >= TRAIN_GPU_FLOOR[0] and acc[1] >= TRAIN_GPU_FLOOR[1] and acc[2] <= TRAIN_GPU_MAX_FIT_S
        if None not in acc
        else None,
    }
    return result


def _device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def collect(out: Path, dry_run: bool) -> dict[str, Any]:
    """Everything the stages under `out` measured, as one dict (what gpu_check.json holds)."""
    stages = read_stages(out)
    bench = benchmarks(out, stages)
    fast_runs = [m for d in sorted((out / "fast_gpu").glob("*")) if d.is_dir() and (m := _metrics(d))]
    fast = _series(fast_runs)
    train_gpu = _metrics(out / "train_gpu")
    profiles = sorted((out / "profile").glob("*profiler*.txt"))
    return {
        "dry_run": dry_run,
        "device": _device(),
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages), 1),
        "benchmark": bench,
        "fast_gpu": fast,
        "fast_gpu_compiled": _metrics(out / "fast_gpu_compiled"),
        "train_gpu": train_gpu,
        "profile": {p.name: p.read_text() for p in profiles if p.stat().st_size},
        "targets": targets(bench, fast, train_gpu),
    }


def archive(out: Path) -> Path:
    """<out>/gpu_check.tar.gz of the files ARCHIVED names (each at most MAX_ARCHIVED_BYTES)."""
    path = out / "gpu_check.tar.gz"
    files = sorted({f for pattern in ARCHIVED for f in out.glob(pattern) if f.is_file()})
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            if f.stat().st_size <= MAX_ARCHIVED_BYTES:
                tar.add(f, arcname=str(f.relative_to(out)))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", default="false", choices=["true", "false"])
    args = parser.parse_args(argv)
    result = collect(args.out, args.dry_run == "true")
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    archive(args.out)
    failed = [s["name"] for s in result["stages"] if s["rc"] != 0]
    print(json.dumps({"targets": result["targets"], "failed_stages": failed}, indent=1))


if __name__ == "__main__":
    main()
