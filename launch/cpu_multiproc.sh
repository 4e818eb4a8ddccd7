#!/usr/bin/env bash
# N CPU processes on this machine (gloo), one training job.
#
# Usage:  bash launch/cpu_multiproc.sh N CONFIG [VERB] [EXTRA ARGS...]
#   bash launch/cpu_multiproc.sh 2 configs/demo.yaml                      # train with 2 processes
#   bash launch/cpu_multiproc.sh 2 configs/demo.yaml train --set sharding.sharding_types=[row_wise]
#   bash launch/cpu_multiproc.sh 2 configs/demo.yaml train --resume       # continue runs/demo/train/last
#   bash launch/cpu_multiproc.sh 2 configs/demo.yaml evaluate             # users split over 2 ranks
#
# Each process gets cores / N threads (OMP_NUM_THREADS), unless OMP_NUM_THREADS is set.
# The global batch (train.batch_size) is the same at any N; it must be divisible by N.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,12p' "$0"; exit 2; fi
N=$1; CONFIG=$2; shift 2
VERB=${1:-train}; [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / N > 0 ? CORES / N : 1 ))}
exec .venv/bin/torchrun --standalone --nproc_per_node="$N" -m twotower_rec "$VERB" --config "$CONFIG" "$@"
