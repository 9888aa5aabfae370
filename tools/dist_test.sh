#!/usr/bin/env bash
# Test a checkpoint with one process per GPU (NCCL), or GPUS CPU processes (gloo) without CUDA.
# Usage: tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py arguments]
#   GPUS: the processes on this machine. Environment: PYTHON, the interpreter (python).
# Several machines: as tools/dist_train.sh (NNODES, NODE_RANK, MASTER_ADDR, PORT), with the
# checkpoint, data and config at the same paths on every machine. Each process tests its share
# of the images; rank 0 gathers the results, then reports the metrics and writes --out. Without
# CUDA they travel through gloo. On GPUs mmengine gathers them through files in .dist_test/
# under the working directory, which the machines must then share, unless the metric is told
# to use NCCL: --cfg-options test_evaluator.collect_device=gpu.
set -e
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py arguments]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
