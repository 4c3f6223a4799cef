#!/usr/bin/env bash
# Create .venv (if missing) and install lmforge into it with the given extras.
#   scripts/setup.sh            # runtime only
#   scripts/setup.sh test       # + test dependencies
# torch is installed first and pinned, so pip never swaps in another build later:
# a machine with an NVIDIA GPU gets the CUDA build; a machine without one the CPU build
# (set LMFORGE_TORCH_INDEX to a wheel index URL to pick a specific build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
TORCH_SPEC="${LMFORGE_TORCH:-torch==2.13.0}"
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of $TORCH_SPEC"
    pip install -q "$TORCH_SPEC"
  else
    echo "setup: no GPU found, installing the CPU build of $TORCH_SPEC"
    pip install -q ${LMFORGE_TORCH_INDEX:+--index-url "$LMFORGE_TORCH_INDEX"} "$TORCH_SPEC"
  fi
fi
pip install -q -e ".${extras:+[$extras]}"
