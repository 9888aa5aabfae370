#!/usr/bin/env bash
# Train with one process per GPU (NCCL), or GPUS CPU processes (gloo) without CUDA.
# Usage: tools/dist_train.sh CONFIG GPUS [tools/train.py arguments]
#   GPUS: the processes on this machine. Environment: PYTHON, the interpreter (python).
# Several machines: run the same command on each, with NNODES (the number of machines),
# NODE_RANK (0 on the machine at MASTER_ADDR, then 1 .. NNODES-1), MASTER_ADDR (127.0.0.1) and
# PORT (29500, a free port there) set alike on all. The data and config must be at the same
# paths on every machine. Rank 0 saves the checkpoints in its work dir; --resume without a path
# resumes every process from the checkpoint rank 0 finds, so that file must be at the same path
# on every machine (a shared work dir, or a copy).
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
