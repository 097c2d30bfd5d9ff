#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install ddpm-sweep into it.
#
# torch is installed first, pinned, so that the package's torch range is already satisfied and pip
# does not pull the newest multi-GB CUDA build. Override the pin for another build, e.g.
#   DDPM_SWEEP_TORCH="torch==2.13.0 --index-url <your torch wheel index>" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${DDPM_SWEEP_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
pip install -q $TORCH_SPEC
pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, lightning_modules, orchestrator; print('ddpm-sweep ready: torch', torch.__version__)"
