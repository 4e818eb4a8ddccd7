#!/usr/bin/env bash
# Several machines, one training job: run this same command on EVERY node.
#
# Usage:  NNODES=2 NPROC_PER_NODE=8 RDZV_HOST=node0.example.com JOB_ID=tt1 \
#           bash launch/multi_node.sh CONFIG [VERB] [EXTRA ARGS...]
#
# torchrun's c10d rendezvous on RDZV_HOST:RDZV_PORT (default 29400) gathers the nodes; any
# node may be the host. All nodes need the same code, .venv, config and data.cache_dir on a
# shared filesystem (checkpoints are written there by every rank). nccl on CUDA, gloo on CPU.
# TWOTOWER_DEVICE=cuda (the default here) makes a node whose torch cannot see its GPU fail at
# once instead of joining on gloo while the others pick nccl (the job would hang at init); set
# TWOTOWER_DEVICE=cpu for a CPU-only cluster.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,13p' "$0"; exit 2; fi
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${RDZV_HOST:?set RDZV_HOST}"
CONFIG=$1; shift
VERB=${1:-train}; [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
export TWOTOWER_DEVICE=${TWOTOWER_DEVICE:-cuda}
exec .venv/bin/torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_HOST}:${RDZV_PORT:-29400}" --rdzv_id="${JOB_ID:-twotower}" \
  -m twotower_rec "$VERB" --config "$CONFIG" "$@"
