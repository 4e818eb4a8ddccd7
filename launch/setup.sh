#!/usr/bin/env bash
# Create .venv and install the pinned torch + fbgemm + torchrec stack, then this package.
#
# Usage:  bash launch/setup.sh            # what `make demo` and `make test` call first
#         PYTHON=python3.11 bash launch/setup.sh
#         DEVICE=cuda bash launch/setup.sh                # the CUDA stack, even on a GPU-less login node
#         DEVICE=cuda CUDA=cu126 bash launch/setup.sh     # another CUDA build of torch + fbgemm-gpu
#         SETUP_DRY_RUN=1 DEVICE=cuda bash launch/setup.sh   # print the install commands, run none
#
# DEVICE=auto (default) picks cuda when nvidia-smi sees a GPU on THIS machine, else cpu; set it
# when you set up on one machine for another. With cuda, torch and fbgemm-gpu both come from
# PyTorch's index for the CUDA tag (default cu128) and from nowhere else (a pin missing there
# is an error, not a silent PyPI build: PyPI's torch 2.13.0 is a CUDA 13 build); a CPU torch or
# a torch of another CUDA version already in the venv is replaced, the CPU fbgemm package
# (which owns the same fbgemm_gpu/*.so files) removed first; then fbgemm's CUDA build and its
# operators must load. Then run `bash launch/gpu_check.sh` on a GPU node.
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
DRY=${SETUP_DRY_RUN:-}

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
        # one index for the pair, no fallback: both builds are then the same CUDA version
        TORCH_INDEX="--index-url https://download.pytorch.org/whl/${CUDA}"
        case "$CUDA" in
          cu[0-9][0-9][0-9]) CUDA_VERSION="${CUDA:2:2}.${CUDA:4:1}" ;;  # cu128 -> 12.8
          *) echo "setup: CUDA=$CUDA: expected a PyTorch index tag such as cu126 or cu128" >&2; exit 2 ;;
        esac ;;
  cpu)  FBGEMM_PACKAGE="fbgemm-gpu-cpu==${FBGEMM_VERSION}"; TORCH_INDEX=""; CUDA_VERSION="" ;;
  *)    echo "setup: DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;;
esac
# tensorboard: train.tensorboard's curves (pyproject's `tensorboard` extra; training runs without it)
RUNTIME_DEPS="tensordict pyre-extensions tqdm torchmetrics==1.9.0 numpy pandas pyarrow pyyaml faiss-cpu==1.13.2 duckdb==2.0.0"
RUNTIME_DEPS="${RUNTIME_DEPS} tensorboard"
TEST_DEPS="pytest hypothesis"
BENCH_DEPS="matplotlib"  # benchmarks/ plots

stamp_text="${DEVICE}/${CUDA} torch==${TORCH_VERSION} ${FBGEMM_PACKAGE} torchrec==${TORCHREC_VERSION} ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS} $(sha256sum pyproject.toml | cut -c1-16)"
stamp_file="${VENV}/.twotower-setup-stamp"

if [ -z "$DRY" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_text" ] \
   && "${VENV}/bin/python" -c "import twotower_rec" >/dev/null 2>&1; then
  echo "setup: ${VENV} is up to date (${FBGEMM_PACKAGE})"
  exit 0
fi

# run COMMAND...: runs it, or with SETUP_DRY_RUN=1 prints it
run() {
  if [ -n "$DRY" ]; then echo "+ $*"; else "$@"; fi
}

if [ ! -x "${VENV}/bin/python" ]; then
  echo "setup: creating ${VENV} with $(${PYTHON} --version)"
  run "${PYTHON}" -m venv "${VENV}"
fi
PY="${VENV}/bin/python"
PIP="${PY} -m pip install --quiet --disable-pip-version-check"

echo "setup: installing torch==${TORCH_VERSION}"
# Pinned exactly: a range would let pip pick a newer multi-GB CUDA build. Set
# PIP_EXTRA_INDEX_URL to a CPU wheel index to get a CPU-only torch on a machine
# without a local wheel.
if [ "$DEVICE" = cuda ]; then
  # pip keeps an installed torch 2.13.0+cpu (or +cu126) as satisfying torch==2.13.0: replace a
  # torch whose CUDA version is not the tag's, and fbgemm-gpu with it
  installed=$("$PY" -c "import torch; print(torch.version.cuda or 'cpu')" 2>/dev/null || echo none)
  run "$PY" -m pip uninstall --quiet -y fbgemm-gpu-cpu  # both packages own fbgemm_gpu/*.so
  if [ "$installed" = "$CUDA_VERSION" ]; then
    echo "setup: torch in ${VENV} is a CUDA ${installed} build"
    # shellcheck disable=SC2086
    run $PIP ${TORCH_INDEX} "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"
  else
    echo "setup: torch in ${VENV} is ${installed}, not CUDA ${CUDA_VERSION}: installing both from ${CUDA}"
    # shellcheck disable=SC2086
    run $PIP --force-reinstall --no-deps ${TORCH_INDEX} "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"
    # shellcheck disable=SC2086
    run $PIP ${TORCH_INDEX} "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"  # their dependencies, same index
  fi
else
  run $PIP "torch==${TORCH_VERSION}"
  echo "setup: installing ${FBGEMM_PACKAGE}"
  run $PIP "torch==${TORCH_VERSION}" "${FBGEMM_PACKAGE}"
fi
echo "setup: installing torchrec==${TORCHREC_VERSION} (no deps)"
run $PIP --no-deps "torchrec==${TORCHREC_VERSION}"
echo "setup: installing runtime and test dependencies"
# shellcheck disable=SC2086
run $PIP "torch==${TORCH_VERSION}" ${RUNTIME_DEPS} ${TEST_DEPS} ${BENCH_DEPS}
echo "setup: installing twotower_rec (editable)"
run $PIP --no-deps -e .

if [ -n "$DRY" ]; then exit 0; fi
DEVICE="$DEVICE" CUDA_VERSION="$CUDA_VERSION" "${PY}" - <<'PY'
import os, sys
import torch, fbgemm_gpu, torchrec  # noqa: F401  the three must load together
print(f"setup: ok  torch {torch.__version__}  torchrec {getattr(torchrec, '__version__', '?')}  "
      f"fbgemm_gpu {fbgemm_gpu.__version__} ({fbgemm_gpu.__variant__})")
if os.environ["DEVICE"] == "cuda":
    if torch.version.cuda != os.environ["CUDA_VERSION"]:
        sys.exit(f"setup: torch is built for CUDA {torch.version.cuda}, not {os.environ['CUDA_VERSION']} (CUDA=)")
    # hasattr(torch.ops.fbgemm, ...) is true for the CPU build too: the build's own metadata says which
    if fbgemm_gpu.__variant__ != "cuda":
        sys.exit(f"setup: fbgemm_gpu is its {fbgemm_gpu.__variant__} build, not cuda: `pip uninstall -y fbgemm-gpu-cpu "
                 "fbgemm-gpu` in the venv, then run this again")
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
