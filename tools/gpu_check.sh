#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of PyTorch (mmcv not needed): builds dk_ops
# with its CUDA kernels in place, runs the CUDA tests (parity with the CPU op, gradcheck,
# reduced precision, opcheck, torch.compile, autocast, determinism) and the CPU op tests that
# need no mmcv, prints the GPU benchmark, and runs a slice of the CUDA tests under
# compute-sanitizer's memcheck where it is installed. Logs go to LOG_DIR.
#
#     bash tools/gpu_check.sh [LOG_DIR]      # PYTHON=python3, MAX_JOBS=nproc by default
#
# Build with the system's gcc/g++ (the C++ ABI PyTorch's wheels use). On one GPU image, CC and
# CXX named a g++ wrapper that put a private copy of libstdc++'s stream code into the
# extension, and every error message that formats a number then crashed (SIGSEGV in
# std::ostream::operator<<(long)): there, run it as `CC=gcc CXX=g++ bash tools/gpu_check.sh`.
set -uo pipefail
PYTHON=${PYTHON:-python3}
LOG_DIR=${1:-work_dirs/gpu_check}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of dk_ops
status=0
step() {  # step NAME COMMAND...: runs COMMAND, its output in LOG_DIR/NAME.log, and says how it ended
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOG_DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PYTHON -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
            "gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())'

step build env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    $PYTHON setup.py build_ext --inplace || exit 1
workers=$($PYTHON -c 'import importlib.util; print("-n 8" if importlib.util.find_spec("xdist") else "")')
step cuda_tests $PYTHON -m pytest -q -p no:cacheprovider $workers -rs tests/test_op_cuda.py
step cpu_op_tests $PYTHON -m pytest -q -p no:cacheprovider $workers -k 'not mmcv' \
    tests/test_op_forward.py tests/test_op_backward.py tests/test_op_errors.py tests/test_modules.py
bench=tools/analysis_tools/benchmark_op.py
step bench_fp32 $PYTHON $bench --device cuda --repeats 30
step bench_fp32_tf32 $PYTHON $bench --device cuda --repeats 30 --tf32
step bench_bf16_batch8 $PYTHON $bench --device cuda --repeats 30 --dtype bfloat16 --batch 8
if command -v compute-sanitizer > /dev/null; then
    step memcheck timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
        $PYTHON -m pytest -q -p no:cacheprovider tests/test_op_cuda.py \
        -k 'float64_matches_cpu and wide or empty_batch'
fi
exit $status
