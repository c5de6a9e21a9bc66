#!/usr/bin/env bash
# The quick start: make .venv if needed, install the project, build the demo assets (first run,
# 20-40 s on a 2-core CPU), then serve the OpenAI-compatible API on embedded defaults (embedded
# Valkey, local object storage, the demo model with its adapters and router). Ctrl-C stops it.
#   scripts/serve.sh [--host 127.0.0.1] [--port 8000] [--num-cpus N]
# Configuration: MOLORA_* environment variables (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import deployments, ray.serve, molora_core' 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    # A CUDA torch already in the venv stays; otherwise take the CPU build.
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
    .venv/bin/python -m pip install -q -e .
fi
if [ -z "${MOLORA_MODEL_PATH:-}" ]; then
    demo="${MOLORA_CACHE_DIR:-$HOME/.cache/molora}/demo"
    [ -f "$demo/manifest.json" ] || .venv/bin/molora demo-assets "$demo"
fi
exec .venv/bin/python -m deployments.main "$@"
