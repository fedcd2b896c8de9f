#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU: bash scripts/gpu_check.sh [extra overrides for the trainings]
#   1. python scripts/train.py trainer=gpu          the default run (small model, 20 epochs), bf16 on one GPU
#   2. python scripts/train.py experiment=fast_gpu  99 % in seconds
#   3. python scripts/benchmark.py trainer=gpu      project path vs bare PyTorch loop, images/s
# and prints their figures: test accuracies, precision and fit_seconds of 1 and 2, the throughput table of 3.
# Meant to take a few minutes on one H200 (each step is bounded by `timeout`); outputs go to
# $GPU_CHECK_DIR (default logs/gpu_check/<date_time>). The same presets run on a CPU in
# tests/test_train.py (trainer.accelerator=cpu), so a config or dtype mistake shows there first.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch

if not torch.cuda.is_available():
    raise SystemExit("error: no CUDA GPU visible (torch.cuda.is_available() is False): run this on a GPU machine.")
print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
PY

out="${GPU_CHECK_DIR:-logs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"
echo "outputs: $out"

print_metrics() {  # $1: run folder
    python - "$1" <<'PY'
import json
import sys
from pathlib import Path

m = json.loads((Path(sys.argv[1]) / "metrics.json").read_text())
print(
    f"{sys.argv[1]}: digit {100 * m['test/digit_acc']:.2f} %, sum {100 * m['test/sum_acc']:.2f} %, "
    f"both {100 * m['test/both_acc']:.2f} %, sum given digit {100 * m['test/sum_given_digit_acc']:.2f} %, "
    f"precision {m.get('precision')}, fit_seconds {m['fit_seconds']}"
)
PY
}

echo "== 1/3 python scripts/train.py trainer=gpu $*"
timeout 300 python scripts/train.py trainer=gpu trainer.enable_progress_bar=false "hydra.run.dir=$out/train_gpu" "$@" \
    >"$out/train_gpu.log" 2>&1 || { tail -n 30 "$out/train_gpu.log"; exit 1; }
print_metrics "$out/train_gpu"

echo "== 2/3 python scripts/train.py experiment=fast_gpu $*"
timeout 120 python scripts/train.py experiment=fast_gpu trainer.enable_progress_bar=false "hydra.run.dir=$out/fast_gpu" "$@" \
    >"$out/fast_gpu.log" 2>&1 || { tail -n 30 "$out/fast_gpu.log"; exit 1; }
print_metrics "$out/fast_gpu"

echo "== 3/3 python scripts/benchmark.py trainer=gpu"
timeout 240 python scripts/benchmark.py trainer=gpu "hydra.run.dir=$out/benchmark" 2>"$out/benchmark.log" \
    | tee "$out/benchmark.txt" || { tail -n 30 "$out/benchmark.log"; exit 1; }

echo "gpu check done: $out"
