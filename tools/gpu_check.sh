#!/usr/bin/env bash
# The GPU check in one call, within 8 minutes on one GPU (so that a rerun still fits a 15-minute
# GPU slot), on a machine with a CUDA build of PyTorch and torchvision (no mmcv needed): builds
# dk_ops for this GPU's architecture only, runs the CUDA tests and the CPU op tests in parallel,
# the op benchmark (float32, TF32, bfloat16 at batch 8, depthwise), the backbone and detector
# benchmark (float32 and AMP), the RTMDet-s backbone's training step (float32, torch alone), a
# compute-sanitizer memcheck slice, and compute-sanitizer's racecheck, synccheck and initcheck on
# one small float32 problem per path of the op, each step under a time budget, and writes one
# Markdown report, LOG_DIR/report.md (each step's log beside it).
# docs/gpu.md says what the numbers mean and which targets they are held to.
#
#     bash tools/gpu_check.sh [--dry-run] [LOG_DIR]       # LOG_DIR: work_dirs/gpu_check
#
# --dry-run (or DRY_RUN=1), on a machine without a GPU: everything but the GPU, to prove the
# script before GPU time is spent on it: the build without CUDA, the same test command (the CUDA
# tests skip), the benchmarks on the CPU at tiny sizes, the sanitizers' problems on the CPU
# without a sanitizer, and the report.
#
# Environment: PYTHON (python3), BUILD_DIR (build/gpu-check in the repository: dk_ops and its
# packages are built there, not in place), MAX_JOBS (nproc), TOTAL_BUDGET (450 s for all the
# steps, three times that in a dry run).
#
# The build uses the system's gcc and g++ whatever CC and CXX say (GPU_CHECK_CC and
# GPU_CHECK_CXX choose others): on one GPU image, CC and CXX named a g++ wrapper that put a
# private copy of libstdc++'s stream code into the extension, and every error message that
# formats a number then crashed (SIGSEGV in std::ostream::operator<<(long)).
set -uo pipefail
DRY_RUN=${DRY_RUN:-0}
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
PYTHON=${PYTHON:-python3}
LOG_DIR=$(mkdir -p "${1:-work_dirs/gpu_check}" && cd "${1:-work_dirs/gpu_check}" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
BUILD_DIR=${BUILD_DIR:-build/gpu-check}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$PWD/$BUILD_DIR ;; esac
# The steps' own budgets add up to more: what one leaves unused goes to the later ones, and the
# total caps them all (a step that would get under 10 s is skipped and counts as failed). A dry
# run gets three times as long: a small CPU is slower at all of it than the GPU machine.
budget_scale=$((DRY_RUN == 1 ? 3 : 1))
TOTAL_BUDGET=${TOTAL_BUDGET:-$((450 * budget_scale))}
# The in-place build of another torch may sit in dk_ops/: import this build's copy. pytest
# runs as `python -P -m pytest`, so that the working directory does not come first either.
export PYTHONPATH="$BUILD_DIR/lib${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + TOTAL_BUDGET))
step_rows=()      # one Markdown row per step, for the report
failed_steps=()   # the report shows the end of their logs
status=0

record() {  # record NAME STATUS SECONDS BUDGET LOG
    step_rows+=("| $1 | $2 | $3 | $4 | $5 |")
}

step() {  # step NAME BUDGET COMMAND...: runs COMMAND under a timeout, logs to LOG_DIR/NAME.log
    local name=$1 budget=$(($2 * budget_scale))
    shift 2
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, the ${TOTAL_BUDGET} s budget is spent"
        record "$name" "skipped: the ${TOTAL_BUDGET} s budget was spent" 0 "$budget" -
        status=1
        return
    fi
    [ "$budget" -le "$left" ] || budget=$left
    echo "== $name (at most $budget s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$LOG_DIR/$name.log"
    local outcome=ok
    case $rc in
        0) ;;
        124 | 137) outcome="timed out after $budget s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    [ $rc -eq 0 ] || { status=1; failed_steps+=("$name"); }
    echo "== $name: $outcome after $((SECONDS - start)) s"
    record "$name" "$outcome" $((SECONDS - start)) "$budget" "$name.log"
}

skip() {  # skip NAME REASON
    echo "== $1: skipped, $2"
    record "$1" "skipped: $2" 0 - -
}

# ------------------------------------------------------------------------------------ machine
about=$("$PYTHON" - <<'EOF'
import platform
import torch
try:
    import torchvision
    vision = torchvision.__version__
except ImportError as error:
    vision = f'not importable ({error})'
print(f'| Python | {platform.python_version()} |')
print(f'| torch | {torch.__version__}, CUDA {torch.version.cuda}, cuDNN '
      f'{torch.backends.cudnn.version()} |')
print(f'| torchvision | {vision} |')
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f'| GPU | {torch.cuda.get_device_name()}, compute capability {major}.{minor}, '
          f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB |')
else:
    print('| GPU | none |')
EOF
) || { echo "gpu_check: $PYTHON cannot import torch" >&2; exit 1; }

if [ "$DRY_RUN" = 1 ]; then
    mode='dry run on the CPU: CPU build, the GPU steps skipped, the benchmarks at tiny sizes'
    cuda_build=(FORCE_CUDA=0)
    arch=none
    op_bench=(--device cpu --shrink 8 --repeats 1)
    column_mib=(--column-mib 1)
    backbone_bench=(--device cpu --batch 1 --image-size 64 64 --repeats 1)
    rtmdet_bench=(--device cpu --batch 1 --image-size 64 64 --repeats 1)
    # AMP on a CPU: rigid alone, to keep the dry run short (torchvision's DCN cannot run it).
    amp_variants=(--variants rigid)
else
    arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || {
        echo 'gpu_check: no CUDA GPU visible to torch (use --dry-run on a CPU)' >&2; exit 1; }
    mode=GPU
    cuda_build=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$arch")
    op_bench=(--device cuda --repeats 30)
    # The local path's column buffer: ceil(S / taps) chunks of the batch by default on a GPU,
    # never timed against others.
    column_mib=(--column-mib 64 256)
    backbone_bench=(--device cuda --repeats 10)
    rtmdet_bench=(--device cuda --batch 8 --image-size 640 640 --repeats 10)
    amp_variants=()
    smi=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv,noheader 2>&1 | head -n 1)
    about+=$'\n'"| nvidia-smi: name, memory, driver, SM clock, its maximum | $smi |"
fi

echo "$about"

# One small float32 problem per path of the op, forward and backward, on the device given as
# its argument: what compute-sanitizer's racecheck, synccheck and initcheck run (a dry run runs
# it on the CPU, without them). The paths are chosen as users choose them, by the environment.
SANITIZER_PROBLEMS=$(cat <<'EOF'
import os
import sys

import torch

import dk_ops

device = sys.argv[1]
generator = torch.Generator().manual_seed(0)


def leaf(*shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=generator)).to(device).requires_grad_()


def run(name, environment, global_offset=False, deformed=False):
    os.environ.update(environment)
    batch, channels, height, width, taps = 2, 6, 7, 9, 9
    kernel_offset = (leaf(batch, 2 * taps, scale=0.7) if global_offset else
                     leaf(batch, 2 * taps, height, width, scale=0.7))
    deformation = dict(data_offset=leaf(batch, 2 * taps, height, width, scale=0.7),
                       mask=leaf(batch, taps, height, width)) if deformed else {}
    inputs = [leaf(batch, channels, height, width), leaf(70, channels, 5, 5), kernel_offset,
              leaf(70)] + list(deformation.values())
    output = dk_ops.deform_kernel_conv2d(*inputs[:4], kernel_size=3, padding=1, **deformation)
    output.square().sum().backward()
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all(), name
    print(f'{name}: forward and backward, output {tuple(output.shape)}')


run('columns, rigid data grid', {'DK_OPS_LOCAL_KERNELS': 'columns'})
run('columns, data offsets and mask', {'DK_OPS_LOCAL_KERNELS': 'columns'}, deformed=True)
run('implicit GEMM, data offsets and mask', {'DK_OPS_LOCAL_KERNELS': 'implicit_gemm'},
    deformed=True)
run('global', {}, global_offset=True)
if device == 'cuda':  # the fused path's switch reaches CUDA tensors only
    run('fused, data offsets and mask', {'DK_OPS_CUDA_PATH': 'fused'}, deformed=True)
EOF
)

# -------------------------------------------------------------------------------------- steps
step build 180 env CC="${GPU_CHECK_CC:-gcc}" CXX="${GPU_CHECK_CXX:-g++}" "${cuda_build[@]}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build --force \
    --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/temp"

tests_and_benchmarks() {
    # One pytest for the CUDA tests and the CPU op tests that need no mmcv, spread over workers
    # with pytest-xdist where it is installed, two threads each.
    local workers=()
    if "$PYTHON" -c 'import xdist' 2> /dev/null; then
        workers=(-n $(($(nproc) > 1 ? $(nproc) / 2 : 1)))
    fi
    step op_tests 120 env OMP_NUM_THREADS=2 "$PYTHON" -P -m pytest -q -p no:cacheprovider \
        "${workers[@]}" -rfs -k 'not mmcv' tests/test_op_cuda.py tests/test_op_forward.py \
        tests/test_op_backward.py tests/test_op_errors.py tests/test_modules.py

    bench=tools/analysis_tools/benchmark_op.py
    step bench_op_float32 45 "$PYTHON" $bench "${op_bench[@]}" "${column_mib[@]}"
    step bench_op_tf32 45 "$PYTHON" $bench "${op_bench[@]}" --tf32
    step bench_op_bfloat16_batch8 45 "$PYTHON" $bench "${op_bench[@]}" --dtype bfloat16 --batch 8 \
        "${column_mib[@]}"
    step bench_op_depthwise 30 "$PYTHON" $bench "${op_bench[@]}" --depthwise

    bench=tools/analysis_tools/benchmark_backbone.py
    step bench_backbone_float32 90 "$PYTHON" $bench "${backbone_bench[@]}" \
        --json "$LOG_DIR/bench_backbone_float32.json"
    step bench_backbone_amp_bfloat16 90 "$PYTHON" $bench "${backbone_bench[@]}" --amp bfloat16 \
        "${amp_variants[@]}" --json "$LOG_DIR/bench_backbone_amp_bfloat16.json"
    step bench_rtmdet_float32 60 "$PYTHON" tools/analysis_tools/benchmark_rtmdet.py \
        "${rtmdet_bench[@]}" --json "$LOG_DIR/bench_rtmdet_float32.json"

    local sanitizer
    sanitizer=$(command -v compute-sanitizer ||
        command -v "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    if [ "$DRY_RUN" = 1 ]; then
        skip memcheck 'dry run (compute-sanitizer checks GPU kernels)'
        step sanitizer_problems 30 "$PYTHON" -P -c "$SANITIZER_PROBLEMS" cpu
    elif [ -z "$sanitizer" ]; then
        for tool in memcheck racecheck synccheck initcheck; do
            skip $tool 'compute-sanitizer is not installed'
        done
    else
        # Without PyTorch's caching allocator every tensor is its own allocation, so that a read
        # past a tensor's end is out of bounds for memcheck too, and a tensor's memory is
        # uninitialised for initcheck until a kernel writes it.
        step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
            --error-exitcode 1 "$PYTHON" -P -m pytest -q -p no:cacheprovider tests/test_op_cuda.py \
            -k 'float64_matches_cpu and wide or empty_batch'
        # racecheck: shared memory written and read by two threads of a block with no barrier
        # between; synccheck: barriers that not every thread reaches; initcheck: the op's kernels
        # reading global memory that nothing wrote (kernels whose name has dk_ops only: the
        # GEMMs' and convolutions' libraries are not this project's to check).
        step racecheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool racecheck \
            --error-exitcode 1 "$PYTHON" -P -c "$SANITIZER_PROBLEMS" cuda
        step synccheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool synccheck \
            --error-exitcode 1 "$PYTHON" -P -c "$SANITIZER_PROBLEMS" cuda
        step initcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool initcheck \
            --kernel-name kns=dk_ops --error-exitcode 1 "$PYTHON" -P -c "$SANITIZER_PROBLEMS" cuda
    fi
}

if [ -n "$(ls "$BUILD_DIR"/lib/dk_ops/_C*.so 2> /dev/null)" ]; then
    tests_and_benchmarks
else
    echo "gpu_check: the build left no $BUILD_DIR/lib/dk_ops/_C*.so: nothing else can run" >&2
    status=1
fi

# ------------------------------------------------------------------------------------- report
tables() {  # the header line and the Markdown table of a benchmark's log
    if [ ! -f "$LOG_DIR/$1.log" ]; then
        echo '(not run)'
    else
        grep -E '^(device=|\||Peak memory|Warning)|: fused / columns' "$LOG_DIR/$1.log" ||
            echo "(no table: see $1.log)"
    fi
}
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '| | |'
    echo '|---|---|'
    echo "| mode | $mode |"
    echo "| build | in $BUILD_DIR, TORCH_CUDA_ARCH_LIST=$arch, CC=${GPU_CHECK_CC:-gcc}," \
        "CXX=${GPU_CHECK_CXX:-g++} |"
    echo "| commit | $(git rev-parse --short HEAD 2> /dev/null || echo unknown) |"
    echo "$about"
    echo "| total | $SECONDS s (budget for the steps: ${TOTAL_BUDGET} s) |"
    echo
    echo '## Steps'
    echo
    echo '| step | status | seconds | budget s | log |'
    echo '|---|---|---|---|---|'
    printf '%s\n' "${step_rows[@]}"
    for name in "${failed_steps[@]}"; do
        printf '\n## %s: the end of its log\n\n```\n' "$name"
        tail -n 20 "$LOG_DIR/$name.log"
        echo '```'
    done
    printf '\n## Op tests\n\n'
    if [ -f "$LOG_DIR/op_tests.log" ]; then
        echo '```'
        grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)|no tests ran' \
            "$LOG_DIR/op_tests.log" | tail -n 30
        echo '```'
    else
        echo '(not run)'
    fi
    for name in bench_op_float32 bench_op_tf32 bench_op_bfloat16_batch8 bench_op_depthwise; do
        printf '\n## %s (forward + backward of the op)\n\n' "$name"
        tables "$name"
    done
    for name in bench_backbone_float32 bench_backbone_amp_bfloat16 bench_rtmdet_float32; do
        printf '\n## %s (training step, ratios to rigid)\n\n' "$name"
        tables "$name"
    done
    for name in memcheck racecheck synccheck initcheck sanitizer_problems; do
        [ -f "$LOG_DIR/$name.log" ] || continue
        printf '\n## %s\n\n```\n' "$name"
        grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)|: forward and backward' \
            "$LOG_DIR/$name.log" | tail -n 6
        echo '```'
    done
} > "$LOG_DIR/report.md"
echo
cat "$LOG_DIR/report.md"
exit $status
