#!/usr/bin/env bash
# Every GPU of this machine, one process per GPU (nccl), one training job.
#
# Usage:  bash launch/single_node_gpu.sh CONFIG [VERB] [EXTRA ARGS...]
#   bash launch/single_node_gpu.sh configs/demo.yaml
#   bash launch/single_node_gpu.sh configs/demo.yaml train --set sharding.sharding_types=[row_wise] \
#        --set train.sparse_optimizer=adam --set train.bf16=true
#   NGPUS=4 bash launch/single_node_gpu.sh configs/demo.yaml        # the first 4 GPUs only
#
# Needs the CUDA fbgemm-gpu (launch/setup.sh picks it when nvidia-smi sees a GPU).
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,11p' "$0"; exit 2; fi
CONFIG=$1; shift
VERB=${1:-train}; [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec .venv/bin/torchrun --standalone --nproc_per_node="$NGPUS" -m twotower_rec "$VERB" --config "$CONFIG" "$@"
