"""scripts/gpu_check.sh --dry-run: every stage of the GPU check, on this CPU at tiny sizes, end to end.

So that a session with a GPU knows the script works before it spends GPU time on it. The stages are the
real commands (benchmark, trainings, profiler) with trainer.accelerator=cpu and a few steps each; the
check is that each ran and that gpu_check.json and gpu_check.tar.gz hold what they measured.
"""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "bench_eager_b32",
    "bench_eager_b64",
    "fast_gpu",
    "train_gpu",
    "profile",
    "bench_compiled_b32",
    "fast_gpu_compiled",
]


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_stage(real_data_dir, tmp_path):
    out = tmp_path / "gpu_check"
    env = os.environ | {"OUT": str(out), "DATA_DIR": str(real_data_dir)}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [(s["name"], s["rc"]) for s in report["stages"]] == [(name, 0) for name in STAGES]
    bench = {(r["mode"], r["batch_size"]): r for r in report["benchmark"]}
    assert set(bench) == {("eager", 32), ("eager", 64), ("compiled", 32)}
    assert all(r["project_img_s"] > 0 and r["raw_img_s"] > 0 for r in bench.values())
    assert [run["seed"] for run in report["fast_gpu"]["runs"]] == [1, 2, 3]
    assert 0 <= report["fast_gpu"]["test/digit_acc_mean"] <= 1
    assert report["fast_gpu_compiled"]["precision"] == report["train_gpu"]["precision"] == "bf16-mixed"
    table = report["profile"]["fit-profiler.txt"]  # the profiled training steps (the test has none)
    assert "ProfilerStep*" in table and "Optimizer.step" in table and "Self CPU" in table
    # Every target is judged from the numbers (on a CPU, not met); the one of batches >= 1024 has none here.
    targets = report["targets"]
    assert targets.pop("img_s_batch_1024_up_max")["met"] is None
    assert {name: target["met"] for name, target in targets.items()} == dict.fromkeys(targets, False)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check.json" in names and "stages.tsv" in names and "train_gpu/metrics.json" in names
    assert not any(name.endswith(".ckpt") for name in names)
