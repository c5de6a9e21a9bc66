#!/usr/bin/env bash
# Everything that needs a GPU, in one call, for a lent GPU machine that runs from the source tree
# (it has torch, triton, transformers, peft, safetensors, pytest and pytest-xdist, but no network,
# ray or redis):
#   scripts/gpu_checks.sh [OUT_DIR] [STAGES]
# STAGES (default "tests bench"): "tests" runs the GPU-marked kernel and decoder tests beside the
# engine suite on CUDA (graph capture included); "bench" runs the layer, decode, prefill and engine
# benchmarks after them, alone on the GPU ("layer", "decode", "prefill" and "engine" run one of them
# each); "sweep", never part of "bench", times the dense_base decode kernel's tile settings at
# Qwen3-0.6B shapes (`lora_decode.py --sweep`). ENGINE_COMPARE, if set, replaces the engine stage's
# second-engine options (empty: none, the three scenarios alone). Each stage has its own time
# limit, so one hang costs only itself.
# Wheels of missing pure-Python packages (pydantic for the engine) can be carried in .whl/ and are
# installed into /tmp/site first. Results go to OUT_DIR (default: $OUT, else benchmarks/out): at most
# 8 files: the machine, versions and the benchmarks' output in one bench.log, each benchmark's JSON,
# the two test logs and the engine profile.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out}}
stages=${2:-tests bench}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The compiled CPU kernels (kernels/cpu_ext.py) are not what this run checks; building them would
# cost the first CPU forward of every test worker a shared compile out of the stages' time limits.
export MOLORA_CPU_KERNELS=${MOLORA_CPU_KERNELS:-0}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__,
        "transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$out/bench.log"
status=0
if [[ $stages == *tests* ]]; then
    # Kernels against their torch twins at real shapes (compiles spread over workers), and beside
    # them the engine suite on CUDA, where every decode step with at most one gate router replays
    # a captured graph.
    # (On an H200 on 2026-11-26: 171-181 s for the first; the second, 38 tests, over 200 s in one
    # worker and over 240 s in four, where the 38th did not finish. It has 54 since 2026-11-27,
    # the sampling, log-probability and min_tokens tests among them, and the prefix-cache tests
    # beside them since the twenty-fourth session: six workers, 400 s. On 2026-11-27, 81 tests in
    # ten workers with one OpenMP thread each took 134-224 s beside the kernel tests. With the
    # engine benchmark after it, that can pass the device tool's 600 s a call: run "tests" and
    # "engine" as two calls then.)
    timeout 240 python3 -m pytest -q -n 8 -m gpu tests/kernels tests/molora_core/test_decoder.py \
        >"$out/gpu_tests.log" 2>&1 &
    kernels=$!
    OMP_NUM_THREADS=1 timeout 400 python3 -m pytest -q -n 10 tests/molora_core/test_engine.py tests/molora_core/test_engine_sampling.py \
        tests/molora_core/test_engine_streaming.py tests/molora_core/test_engine_graphs.py \
        tests/molora_core/test_prefix_cache.py >"$out/engine_tests_cuda.log" 2>&1 &
    engine=$!
    wait $kernels || status=1
    wait $engine || status=1
    tail -n 25 "$out/gpu_tests.log" "$out/engine_tests_cuda.log"
fi
want() { [[ " $stages " == *" $1 "* || " $stages " == *" bench "* ]]; }
if want layer; then
    timeout 60 python3 benchmarks/lora_layer.py --out "$out/lora_layer-gpu.json" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want decode; then
    timeout 90 python3 benchmarks/lora_decode.py --repeats 20 --out "$out/lora_decode-gpu.json" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want prefill; then
    timeout 90 python3 benchmarks/lora_prefill.py --out "$out/lora_prefill-gpu.json" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want engine; then
    # The default prefill kernels (slot-dense, two launches a group of modules, no atomics, where
    # the slots in use allow) against the grouped ones (per module, every step), and the default
    # 16-bit decode kernel (base projection and LoRA in one launch, dense_base) against the base
    # matmul then the slot-dense LoRA (dense), each on a second engine, end to end, and where each
    # scenario's time goes, prefill alone and whole run (PEFT, slow at this size, was measured
    # before: --skip-peft); seven runs each, so the row kept is a true median (single repeats of
    # gate/base spread 0.74-0.93 on the H200 on 2026-11-27).
    # shellcheck disable=SC2086  # the options are words
    timeout 330 python3 benchmarks/engine.py --repeats 7 --skip-peft \
        ${ENGINE_COMPARE---compare-prefill grouped --compare-decode dense} \
        --out "$out/engine-gpu.json" --profile "$out/engine_profile.txt" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if [[ " $stages " == *" sweep "* ]]; then
    # Its JSON is written after each group, so a run the limit stops keeps what it finished.
    timeout "${SWEEP_LIMIT:-200}" python3 benchmarks/lora_decode.py --repeats 10 --skip-per-group --sweep \
        --sweep-kernels dense_base --sweep-shapes qwen3-0.6b --out "$out/lora_decode-sweep-gpu.json" 2>&1 |
        tee -a "$out/bench.log" || status=1
fi
exit $status
