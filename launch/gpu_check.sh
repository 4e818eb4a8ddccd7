#!/usr/bin/env bash
# The GPU self-test: run it once on a GPU node after `DEVICE=cuda bash launch/setup.sh`.
#
# Usage:  bash launch/gpu_check.sh                  # 1 GPU and every visible GPU (CUDA_VISIBLE_DEVICES)
#         bash launch/gpu_check.sh --cpu            # the same checks on 2 CPU processes (gloo)
#         bash launch/gpu_check.sh --cpu --quick    # the short version `make test` runs
#         bash launch/gpu_check.sh --help           # every option
#
# Trains every model variant on a tiny synthetic job with the pipeline on, at 1 and N processes,
# and compares the per-step losses with one CPU process in float32; then bf16, fused Adam, UVM
# caching, a row-wise plan, evaluate, export, recommend and --resume from N processes to 1.
# Prints one PASS/FAIL/SKIP table (also runs/gpu_check/gpu_check.json); exits 1 if any failed.
# Each run's log is under runs/gpu_check/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then echo "gpu_check: no $PY; run 'bash launch/setup.sh' first" >&2; exit 2; fi
exec "$PY" launch/gpu_check.py "$@"
