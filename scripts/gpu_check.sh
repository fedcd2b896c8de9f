#!/usr/bin/env bash
# The GPU checks of issue 25, one prepared run for a borrowed GPU (meant for under 8 minutes on one H200):
#   bash scripts/gpu_check.sh              on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run    the same stages on this CPU at tiny sizes (tests/test_gpu_check.py)
# Stages, in this order (each bounded by `timeout`, all together by a budget of 7.5 min; a failed or
# timed-out stage is recorded and the next one runs, one left without time is skipped):
#   bench_eager_b<B>     python scripts/benchmark.py trainer=gpu models=[small], project vs bare loop, at
#                        batch sizes B = 256, 1024, 4096
#   fast_gpu             python scripts/train.py -m experiment=fast_gpu seed=1,2,3
#   train_gpu            python scripts/train.py trainer=gpu seed=1 (the default schedule)
#   profile              3 training steps of trainer=gpu under Lightning's PyTorchProfiler
#   bench_compiled_b<B>  the benchmark again with model.compile=true model.compile_mode=reduce-overhead
#   fast_gpu_compiled    experiment=fast_gpu seed=1, compiled
# Everything measured goes into <out>/gpu_check.json, and the logs, metrics.json files and profiler
# output into <out>/gpu_check.tar.gz (no checkpoints); <out> is $OUT if set, else $GPU_CHECK_DIR, else
# logs/gpu_check/<date_time>. Extra arguments are passed to every training (not to the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=false
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=true
    shift
fi

if ! $dry_run; then
    python - <<'PY'
import torch

if not torch.cuda.is_available():
    raise SystemExit("error: no CUDA GPU visible (torch.cuda.is_available() is False): run this on a GPU machine.")
print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
PY
fi

out="${OUT:-${GPU_CHECK_DIR:-logs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
echo "outputs: $out"
: >"$out/stages.tsv"

# The sizes of a real check and of a dry run. The real one's budget, estimated (not yet measured on an
# H200): about 1 min for the eager benchmarks, 2-3 min for the compiled ones (a compile per batch size),
# 1 min per fast_gpu series, 1 min for train_gpu, 0.5 min for the profile.
if $dry_run; then
    batch_sizes=(32 64)
    # One compiled size: a compile takes minutes on a CPU, and the loop over sizes is the same code.
    compiled_sizes=(32)
    bench_args=(steps=2 warmup=1 repeats=1)
    # Tiny everything, on the CPU, with the GPU presets' bf16 and data on the device (as tests/test_train.py).
    # Batch 32 everywhere: the compiled training then reuses the compiled benchmark's graph (inductor's cache).
    common=(trainer.accelerator=cpu trainer.limit_train_batches=3 trainer.limit_val_batches=1
        trainer.limit_test_batches=1 trainer.max_epochs=1 not_digit_accept=null data.batch_size=32
        data.eval_batch_size=500)
    bench_common=(trainer.accelerator=cpu)
    bench_top=(trainer.accelerator=cpu)
    scale=20
else
    batch_sizes=(256 1024 4096)
    compiled_sizes=("${batch_sizes[@]}")
    bench_args=(steps=100 warmup=20 repeats=3)
    common=()
    bench_common=()
    bench_top=()
    scale=1
fi
compiled=(model.compile=true model.compile_mode=reduce-overhead)
quiet=(trainer.enable_progress_bar=false extras.print_config=false)

# The whole check ends within budget_s (7.5 min on a GPU): a stage gets at most what is left, and one
# that would start with under 30 s left is skipped (recorded with exit status -1).
budget_s=$((450 * scale))
started_s=$(date +%s)

run_stage() {  # name, timeout in seconds, command...: the command's output in <out>/<name>.log
    local name="$1" limit="$2"
    shift 2
    local left=$((budget_s - ($(date +%s) - started_s)))
    if ((left < 30)); then
        echo "== $name skipped: ${left} s left of the ${budget_s} s budget"
        printf '%s\t%s\t%s\t%s\n' "$name" -1 0 "$*" >>"$out/stages.tsv"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s): $*"
    local start rc=0
    start=$(date +%s.%N)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
    local seconds
    seconds=$(python -c "import sys; print(round($(date +%s.%N) - $start, 1))")
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$*" >>"$out/stages.tsv"
    if [[ $rc -ne 0 ]]; then
        echo "   failed (exit $rc, 124: timed out) after ${seconds} s; last lines of $out/$name.log:"
        tail -n 15 "$out/$name.log" | sed 's/^/   | /'
    else
        echo "   done in ${seconds} s"
    fi
}

bench() {  # mode (eager, compiled), batch size
    local mode="$1" batch="$2"
    local extra=("data.batch_size=$batch" "${bench_common[@]}")
    [[ $mode == compiled ]] && extra+=("${compiled[@]}")
    # overrides=["a","b",...]: one Hydra list of quoted strings.
    local joined
    joined=$(printf '"%s",' "${extra[@]}")
    joined=${joined%,}
    local limit=$((90 * scale))
    [[ $mode == compiled ]] && limit=$((150 * scale))  # a compile per batch size
    run_stage "bench_${mode}_b${batch}" "$limit" python scripts/benchmark.py trainer=gpu \
        models=[small] format=json "${bench_args[@]}" "${bench_top[@]}" "overrides=[$joined]" \
        "hydra.run.dir=$out/bench_${mode}_b${batch}"
}

# In order of need, should the budget run out: eager throughput, the presets' accuracy and time, the
# profile, then what compiling changes.
for batch in "${batch_sizes[@]}"; do
    bench eager "$batch"
done
run_stage fast_gpu $((120 * scale)) python scripts/train.py -m experiment=fast_gpu seed=1,2,3 \
    "hydra.sweep.dir=$out/fast_gpu" "${quiet[@]}" "${common[@]}" "$@"
run_stage train_gpu $((150 * scale)) python scripts/train.py trainer=gpu seed=1 \
    "hydra.run.dir=$out/train_gpu" "${quiet[@]}" "${common[@]}" "$@"
# Steps 21-23 of the first epoch (past cuDNN's autotuning): the operators' table in fit-profiler.txt and a
# Chrome trace beside it. No validation or post-training fits; the test after fit is not profiled.
run_stage profile $((90 * scale)) python scripts/train.py trainer=gpu seed=1 \
    "hydra.run.dir=$out/profile" "${quiet[@]}" "${common[@]}" trainer.max_epochs=1 \
    trainer.limit_train_batches=30 trainer.limit_val_batches=0 calibrate=false not_digit_accept=null \
    +trainer.profiler._target_=mnist_adder.training.step_speed.StepProfiler \
    "+trainer.profiler.dirpath=$out/profile" +trainer.profiler.filename=profiler \
    +trainer.profiler.schedule._target_=torch.profiler.schedule +trainer.profiler.schedule.skip_first=18 \
    +trainer.profiler.schedule.wait=1 +trainer.profiler.schedule.warmup=1 \
    +trainer.profiler.schedule.active=3 +trainer.profiler.row_limit=40 "$@"

for batch in "${compiled_sizes[@]}"; do
    bench compiled "$batch"
done
run_stage fast_gpu_compiled $((120 * scale)) python scripts/train.py experiment=fast_gpu seed=1 \
    "${compiled[@]}" "hydra.run.dir=$out/fast_gpu_compiled" "${quiet[@]}" "${common[@]}" "$@"

python -m mnist_adder.tools.gpu_check "$out" --dry-run="$dry_run"
echo "gpu check done: $out/gpu_check.json, $out/gpu_check.tar.gz"
