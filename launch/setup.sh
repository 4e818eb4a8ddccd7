#!/usr/bin/env bash
# Create .venv and install the pinned torch + fbgemm + torchrec stack, then this package.
#
# Usage:  bash launch/setup.sh            # what `make demo` and `make test` call first
#         PYTHON=python3.11 bash launch/setup.sh
#         DEVICE=cuda bash launch/setup.sh                # the CUDA stack, even on a GPU-less login node
#         DEVICE=cuda CUDA=cu126 bash launch/setup.sh     # another CUDA build of torch + fbgemm-gpu
#
# DEVICE=auto (default) picks cuda when nvidia-smi sees a GPU on THIS machine, else cpu; set it
# when you set up on one machine for another. With cuda, torch and fbgemm-gpu both come from
# PyTorch's index for the CUDA tag (default cu128), so their CUDA builds match, and a CPU torch
# already in the venv is replaced; then fbgemm's CUDA ops must load. Then run
# `bash launch/gpu_check.sh` on a GPU node.
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

DEVICE=${DEVICE:-auto}
CUDA=${CUDA:-cu128}
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in
  cuda) FBGEMM_PACKAGE="fbgemm-gpu==${FBGEMM_VERSION}"
        TORCH_INDEX="--index-url https://download.pytorch.org/whl/${CUDA} --extra-index-url https://pypi.org/simple" ;;
  cpu)  FBGEMM_PACKAGE="fbgemm-gpu-cpu==${FBGEMM_VERSION}"; TORCH_INDEX="" ;;
  *)    echo "setup: DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;;
esac
RUNTIME_DEPS="tensordict pyre-extensions tqdm torchmetrics==1.9.0 numpy pandas pyarrow pyyaml faiss-cpu==1.13.2 duckdb==2.0.0"
TEST_DEPS="pytest hypothesis"
BENCH_DEPS="matplotlib"  # benchmarks/ plots

stamp_text="${DEVICE}/${CUDA} torch==${TORCH_VERSION} ${FBGEMM_PACKAGE} torchrec==${TORCHREC_VERSION} ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS} $(sha256sum pyproject.toml | cut -c1-16)"
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
if [ "$DEVICE" = cuda ]; then
  # pip keeps an installed torch 2.13.0+cpu as satisfying torch==2.13.0: replace a CPU build.
  if "${VENV}/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" >/dev/null 2>&1; then
    echo "setup: torch in ${VENV} is a CUDA build"
  else
    # shellcheck disable=SC2086
    $PIP --force-reinstall --no-deps ${TORCH_INDEX} "torch==${TORCH_VERSION}"
  fi
  # shellcheck disable=SC2086
  $PIP ${TORCH_INDEX} "torch==${TORCH_VERSION}"
else
  $PIP "torch==${TORCH_VERSION}"
fi
echo "setup: installing ${FBGEMM_PACKAGE} and torchrec==${TORCHREC_VERSION} (no deps)"
# shellcheck disable=SC2086
$PIP ${TORCH_INDEX} "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"
$PIP --no-deps "torchrec==${TORCHREC_VERSION}"
echo "setup: installing runtime and test dependencies"
# shellcheck disable=SC2086
$PIP "torch==${TORCH_VERSION}" ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS}
echo "setup: installing twotower_rec (editable)"
$PIP --no-deps -e .

DEVICE="$DEVICE" "${VENV}/bin/python" - <<'PY'
import os, sys
import torch, fbgemm_gpu, torchrec  # noqa: F401  the three must load together
print(f"setup: ok  torch {torch.__version__}  torchrec {getattr(torchrec, '__version__', '?')}")
if os.environ["DEVICE"] == "cuda":
    if torch.version.cuda is None:
        sys.exit("setup: DEVICE=cuda but torch is a CPU build; check CUDA= (the PyTorch index tag)")
    if not hasattr(torch.ops.fbgemm, "asynchronous_complete_cumsum"):
        sys.exit("setup: fbgemm_gpu's operators did not load (its CUDA build must match torch's)")
    if torch.cuda.is_available():
        out = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([2, 3], dtype=torch.int32, device="cuda"))
        assert out.tolist() == [0, 2, 5], out
        print(f"setup: CUDA {torch.version.cuda} ok on {torch.cuda.device_count()} GPU(s); "
              "next: bash launch/gpu_check.sh")
    else:
        print(f"setup: CUDA {torch.version.cuda} build installed; no GPU visible here, so its kernels were not "
              "run: run `bash launch/gpu_check.sh` on a GPU node")
PY
echo "$stamp_text" > "$stamp_file"
