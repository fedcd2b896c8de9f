"""The benchmark runs both paths for real and prints what it promises (timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_json_lines(tiny_mnist, tmp_path):
    cmd = [
        sys.executable,
        "scripts/benchmark.py",
        "models=[small,seed]",
        "steps=3",
        "warmup=1",
        "repeats=1",
        "format=json",
        f"paths.data_dir={tiny_mnist}",
        'overrides=["data.val_size=50","data.batch_size=32"]',
        f"hydra.run.dir={tmp_path / 'bench'}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["small", "seed"]
    for r in rows:
        assert r["project_img_s"] > 0 and r["raw_img_s"] > 0
        assert abs(r["ratio"] - r["project_img_s"] / r["raw_img_s"]) < 1e-2
        assert r["device"].startswith("cpu")
