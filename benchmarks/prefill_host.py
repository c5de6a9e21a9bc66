"""Host time of an eager prefill step, with every Triton LoRA launch stubbed out (a CPU proxy).

A GPU prefill step runs eagerly, and on an H200 it took 2-4x its device time in wall time
(`results/logs/engine_profile-h200.txt`): it waits on the host. This measures the host side on a
CPU, where tiny tensors make every op cost about its dispatch and the LoRA kernels' launches
are replaced by no-ops (counted), so what remains is the Python and dispatcher work a GPU step
queues, without the Triton launcher's own cost (about 10-20 us a launch, per Triton's issues):
  launchers  `TritonBackend.apply_shared` over 28 Qwen3-0.6B-shaped layers for a gate-like top-2
             step of 40 tokens over 4 adapters, per prefill kernel;
  engine     the first (prefill) step of an engine at full depth and tiny sizes (28 layers,
             hidden 64, 16 prompts of 16 tokens, decoder ops in torch as on a GPU), for
             (a) base, (b) an adapter per request, (c) a gate over 4 adapters, per prefill kernel;
  attention  the same model's forward alone over those 16 fresh prompts, which attend together
             (one SDPA call a layer), against each prompt on its own SDPA call, interleaved.

    python benchmarks/prefill_host.py [--dtype float32]

bf16 by default, as on a GPU; on a CPU without bf16 dot-product instructions (AVX2) bf16 ops
cost their arithmetic more than their dispatch, and `--dtype float32` is the closer proxy.

Prints a table (medians) and writes JSON. Not a GPU timing: the H200's host runs each CUDA op
slower than this CPU runs a tiny one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton's CPU mode: the launchers run, the kernels are stubbed
os.environ.setdefault("MOLORA_CPU_KERNELS", "0")  # the decoder's torch ops, as a GPU runs them

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

KERNELS = {"kernels.lora_shrink": ["_lora_shrink_kernel"], "kernels.lora_expand": ["_lora_expand_kernel"],
           "kernels.lora_dense": ["_lora_dense_kernel", "_lora_dense_shrink_kernel"]}
PREFILL_KERNELS = ("auto", "grouped")
TINY = dict(hidden=64, layers=28, heads=4, kv=2, head_dim=16, inter=128, vocab=512, batch=16, prompt=16, new=1)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` counts the launch and runs nothing."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1
        return launch


def stub_kernels() -> None:
    import importlib

    for module, names in KERNELS.items():
        for name in names:
            setattr(importlib.import_module(module), name, _NoLaunch())


def timed(fn, repeats: int, warmups: int = 3) -> tuple[float, int]:
    """(median ms of fn over `repeats` runs after `warmups`, launches of the last run). The
    warm-ups matter on CPU: glibc raises its mmap threshold only after the first large frees,
    and until then every fp32 scratch buffer of the grouped kernels is a fresh mapping."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        _NoLaunch.launches = 0
        started = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times), _NoLaunch.launches


def launcher_rows(repeats: int, dtype: torch.dtype) -> list[dict]:
    from benchmarks.lora_decode import GROUPS, make_layers
    from benchmarks.lora_prefill import NUM_ADAPTERS, RANK, prefill_routings
    from kernels.backends import TritonBackend
    from kernels.meta import build_dispatch

    tokens = 40
    layers = make_layers(28, NUM_ADAPTERS, RANK, dtype, "cpu", base=False)
    xs = [torch.randn(tokens, d_in, dtype=dtype) for _, d_in, _ in GROUPS]
    outs = [torch.zeros(tokens, sum(d_outs), dtype=dtype) for _, _, d_outs in GROUPS]
    slots, weights = prefill_routings(tokens, "cpu")["gate_top2"]
    rows = []
    for kernel in PREFILL_KERNELS:
        backend = TritonBackend(prefill_kernel=kernel)

        def step():
            meta = build_dispatch(slots, weights, NUM_ADAPTERS)
            for layer in layers:
                for (_, _, d_outs), group, x, out in zip(GROUPS, layer, xs, outs):
                    backend.apply_shared(x, group["lora_a"], group["lora_b"], group["ranks"], group["scales"], meta,
                                         list(out.split(d_outs, dim=1)))

        ms, launches = timed(step, repeats)
        rows.append({"part": "launchers", "scenario": "gate_top2", "prefill_kernel": kernel, "host_ms": ms,
                     "launches": launches})
    return rows


def engine_rows(repeats: int, dtype: torch.dtype) -> list[dict]:
    from benchmarks.engine import make_assets, requests
    from benchmarks.lora_prefill import NUM_ADAPTERS, RANK
    from molora_core.engine import Engine, EngineConfig
    from molora_core.model import load_pretrained
    from molora_core.peft_io import load_peft_adapter
    from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, GateSpec

    s = TINY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, s, dtype)
        gate = GateRouter(s["hidden"], [f"a{i}" for i in range(NUM_ADAPTERS)], top_k=2)
        scenarios = {"a_base": lambda i: BaseSpec(), "b_adapter_per_request": lambda i: AdapterSpec(f"a{i % 4}"),
                     "c_gate_per_token": lambda i: GateSpec(gate)}
        for kernel in PREFILL_KERNELS:
            config = EngineConfig(max_batch=s["batch"], max_seq_len=2 * s["prompt"], hot_slots=NUM_ADAPTERS,
                                  max_rank=RANK, max_top_k=2, prefill_chunk=s["batch"] * s["prompt"],
                                  max_step_tokens=s["batch"] * (s["prompt"] + 1), backend="triton",
                                  prefill_kernel=kernel, prefix_caching=False)  # (timed prefills repeat)
            engine = Engine(load_pretrained(root / "model", str(dtype).removeprefix("torch."), "cpu"), config,
                            adapter_loader=lambda name: load_peft_adapter(root / name, name=name))
            for name, routing in scenarios.items():
                step_s = []

                def run():
                    engine.counters.step_s.clear()
                    engine.generate(requests(s, routing))
                    step_s.append(engine.counters.step_s[0])  # the prefill step alone, not admission

                _, launches = timed(run, repeats)
                rows.append({"part": "engine", "scenario": name, "prefill_kernel": kernel,
                             "host_ms": 1e3 * statistics.median(step_s[-repeats:]), "launches": launches})
            engine.close()
    return rows


def attention_rows(repeats: int, dtype: torch.dtype) -> list[dict]:
    """The decoder's forward over a prefill of TINY's fresh prompts, all of one length (no
    engine, no LoRA): the prompts attending together (one SDPA call a layer, the decoder's way)
    against each on its own call (the way before 2026-11-27, here by emptying the step's
    attention runs), interleaved in one process so that a slow spell of the machine hits both."""
    from benchmarks.engine import make_assets
    from molora_core.model import KVCache, StepBatch, load_pretrained
    from molora_core.model.attention import AttentionMeta

    s = TINY
    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp), s, dtype)
        model = load_pretrained(Path(tmp) / "model", str(dtype).removeprefix("torch."), "cpu").model
    cache = KVCache.for_model(model, s["batch"], s["prompt"] + 1)
    batch = StepBatch.build(range(s["batch"]), [s["prompt"]] * s["batch"], [s["prompt"]] * s["batch"])
    ids = torch.randint(0, s["vocab"], (batch.num_tokens,), generator=torch.Generator().manual_seed(0))
    positions = batch.positions()
    build = AttentionMeta.__dict__["build"]  # the classmethod itself, to put back

    def one_call_each(cls, *args, **kwargs):
        meta = build.__func__(cls, *args, **kwargs)
        meta.prefill_runs, meta.prefill_rest = [], list(meta.prefill)
        return meta

    builds = {"together": build, "one call each": classmethod(one_call_each)}
    times, logits = {name: [] for name in builds}, {}
    try:
        for i in range(3 + repeats):
            for name in builds if i % 2 else reversed(list(builds)):
                AttentionMeta.build = builds[name]
                started = time.perf_counter()
                with torch.inference_mode():
                    logits[name] = model(ids, positions, batch, cache, logits="last")
                times[name].append(1e3 * (time.perf_counter() - started))
    finally:
        AttentionMeta.build = build
    equal = torch.equal(logits["together"], logits["one call each"])
    return [{"part": "attention", "scenario": f"{s['batch']} prompts, {name}", "prefill_kernel": "-",
             "host_ms": statistics.median(times[name][3:]), "launches": 0, "logits_equal": equal}
            for name in builds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the weights' and activations' dtype (bfloat16, as on a GPU; float32 on a CPU without "
                             "bfloat16 dot-product instructions, where bfloat16 ops cost their arithmetic, not "
                             "their dispatch)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "prefill_host.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops: no OpenMP wake-ups in the way
    stub_kernels()
    dtype = getattr(torch, args.dtype)
    rows = launcher_rows(args.repeats, dtype) + engine_rows(args.repeats, dtype)
    rows += attention_rows(args.repeats, dtype)
    print(f"host time per prefill step, Triton LoRA launches stubbed out (CPU proxy), {args.dtype}, "
          f"medians of {args.repeats}")
    print_table(rows, [("part", ""), ("scenario", ""), ("prefill_kernel", ""), ("host_ms", ".2f"), ("launches", "d")])
    print(f"attention: logits equal either way: {rows[-1]['logits_equal']}")
    write_json(args.out, {"benchmark": "prefill_host", "environment": environment("cpu"), "sizes": TINY,
                          "dtype": args.dtype, "repeats": args.repeats, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
