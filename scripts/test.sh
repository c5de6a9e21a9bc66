#!/usr/bin/env bash
# One command for a fresh machine: make .venv, install the project with its dev extra, run the suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh tests/kernels -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A CUDA torch already in the venv stays; otherwise take the CPU build (2.13.0 lies on local disk).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
