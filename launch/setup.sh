#!/usr/bin/env bash
# Create .venv and install the pinned torch + fbgemm + torchrec stack, then this package.
#
# Usage:  bash launch/setup.sh            # what `make demo` and `make test` call first
#         PYTHON=python3.11 bash launch/setup.sh
#
# Idempotent: a stamp file records the pins that were installed; a second run with
# the same pins and the same pyproject.toml only checks the stamp (about a second).
# Pins (see ../shared/ENVIRONMENT.md): torch, fbgemm-gpu and torchrec move together;
# torchrec is installed with --no-deps because its metadata asks for the CUDA
# fbgemm-gpu and an old torchmetrics.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM_PACKAGE="fbgemm-gpu==${FBGEMM_VERSION}"
else
  FBGEMM_PACKAGE="fbgemm-gpu-cpu==${FBGEMM_VERSION}"
fi
RUNTIME_DEPS="tensordict pyre-extensions tqdm torchmetrics==1.9.0 numpy pandas pyarrow pyyaml faiss-cpu==1.13.2 duckdb==2.0.0"
TEST_DEPS="pytest hypothesis"
BENCH_DEPS="matplotlib"  # benchmarks/ plots

stamp_text="torch==${TORCH_VERSION} ${FBGEMM_PACKAGE} torchrec==${TORCHREC_VERSION} ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS} $(sha256sum pyproject.toml | cut -c1-16)"
stamp_file="${VENV}/.twotower-setup-stamp"

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_text" ] \
   && "${VENV}/bin/python" -c "import twotower_rec" >/dev/null 2>&1; then
  echo "setup: ${VENV} is up to date (${FBGEMM_PACKAGE})"
  exit 0
fi

if [ ! -x "${VENV}/bin/python" ]; then
  echo "setup: creating ${VENV} with $(${PYTHON} --version)"
  "${PYTHON}" -m venv "${VENV}"
fi
PIP="${VENV}/bin/python -m pip install --quiet --disable-pip-version-check"

echo "setup: installing torch==${TORCH_VERSION}"
# Pinned exactly: a range would let pip pick a newer multi-GB CUDA build. Set
# PIP_EXTRA_INDEX_URL to a CPU wheel index to get a CPU-only torch on a machine
# without a local wheel.
$PIP "torch==${TORCH_VERSION}"
echo "setup: installing ${FBGEMM_PACKAGE} and torchrec==${TORCHREC_VERSION} (no deps)"
$PIP "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"
$PIP --no-deps "torchrec==${TORCHREC_VERSION}"
echo "setup: installing runtime and test dependencies"
# shellcheck disable=SC2086
$PIP "torch==${TORCH_VERSION}" ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS}
echo "setup: installing twotower_rec (editable)"
$PIP --no-deps -e .

"${VENV}/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401  the three must load together
print(f"setup: ok  torch {torch.__version__}  torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}")
PY
echo "$stamp_text" > "$stamp_file"
