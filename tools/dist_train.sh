#!/usr/bin/env bash
# Train with one process per GPU (NCCL), or NPROC CPU processes (gloo) without CUDA.
# Usage: tools/dist_train.sh CONFIG GPUS [tools/train.py arguments]
# Environment: NNODES, NODE_RANK, MASTER_ADDR, PORT for multi-node runs; PYTHON for the interpreter.
set -e
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [train.py arguments]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
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
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
