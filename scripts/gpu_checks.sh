#!/usr/bin/env bash
# Everything that needs a GPU, in one call, for a lent GPU machine that runs from the source tree
# (it has torch, triton, transformers, peft, safetensors and pytest, but no network, ray or redis):
#   scripts/gpu_checks.sh [OUT_DIR]
# Wheels of missing pure-Python packages (pydantic for the engine) can be carried in .whl/ and are
# installed into /tmp/site first. Results go to OUT_DIR (default: $OUT, else benchmarks/out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
status=0
python3 -m pytest -q -m gpu tests/kernels tests/molora_core 2>&1 | tee "$out/gpu_tests.log" || status=1
# The engine suite on CUDA: every decode step with at most one gate router replays a captured graph.
python3 -m pytest -q tests/molora_core/test_engine.py tests/molora_core/test_engine_streaming.py \
    tests/molora_core/test_engine_graphs.py 2>&1 | tee "$out/engine_tests_cuda.log" || status=1
python3 benchmarks/lora_layer.py --out "$out/lora_layer-gpu.json" 2>&1 | tee "$out/lora_layer.log" || status=1
python3 benchmarks/engine.py --out "$out/engine-gpu.json" 2>&1 | tee "$out/engine.log" || status=1
exit $status
