#!/usr/bin/env bash
# Every GPU of this machine, one process per GPU (nccl), one training job.
#
# Usage:  bash launch/single_node_gpu.sh CONFIG [VERB] [EXTRA ARGS...]
#   bash launch/single_node_gpu.sh configs/demo.yaml
#   bash launch/single_node_gpu.sh configs/demo.yaml train --set sharding.sharding_types=[row_wise] \
#        --set train.sparse_optimizer=adam --set train.bf16=true
#   NGPUS=4 bash launch/single_node_gpu.sh configs/demo.yaml        # the first 4 GPUs only
#
# Needs the CUDA stack (DEVICE=cuda bash launch/setup.sh) and a passing launch/gpu_check.sh.
# GPUs are counted as torch sees them: CUDA_VISIBLE_DEVICES and MIG slices are honoured.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,11p' "$0"; exit 2; fi
CONFIG=$1; shift
VERB=${1:-train}; [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")}
if [ "$NGPUS" -lt 1 ]; then echo "no GPU visible to torch (see: bash launch/gpu_check.sh)" >&2; exit 1; fi
# The host's cores shared by its processes, not each process taking them all.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPUS > 0 ? $(nproc) / NGPUS : 1 ))}
export TWOTOWER_DEVICE=${TWOTOWER_DEVICE:-cuda}  # fail rather than train on the CPU unnoticed
exec .venv/bin/torchrun --standalone --nproc_per_node="$NGPUS" -m twotower_rec "$VERB" --config "$CONFIG" "$@"
