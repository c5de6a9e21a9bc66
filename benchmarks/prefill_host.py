"""Host time of an eager prefill step, with every Triton LoRA launch stubbed out (a CPU proxy).

A GPU prefill step runs eagerly, and on an H200 it took 2-4x its device time in wall time
(`results/logs/engine_profile-h200.txt`): it waits on the host. This measures the host side on a
CPU, where tiny tensors make every op cost about its dispatch and the LoRA kernels' launches
are replaced by no-ops (counted), so what remains is the Python and dispatcher work a GPU step
queues, without the Triton launcher's own cost (about 10-20 us a launch, per Triton's issues):
  launchers  `TritonBackend.apply_shared` over 28 Qwen3-0.6B-shaped layers for a gate-like top-2
             step of 40 tokens over 4 adapters, per prefill kernel;
  engine     the first (prefill) step of an engine at full depth and tiny sizes (28 layers,
             hidden 64, 16 prompts of 16 tokens, bf16, decoder ops in torch as on a GPU), for
             (a) base, (b) an adapter per request, (c) a gate over 4 adapters, per prefill kernel.

    python benchmarks/prefill_host.py

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


def launcher_rows(repeats: int) -> list[dict]:
    from benchmarks.lora_decode import GROUPS, make_layers
    from benchmarks.lora_prefill import NUM_ADAPTERS, RANK, prefill_routings
    from kernels.backends import TritonBackend
    from kernels.meta import build_dispatch

    tokens = 40
    layers = make_layers(28, NUM_ADAPTERS, RANK, torch.bfloat16, "cpu", base=False)
    xs = [torch.randn(tokens, d_in).bfloat16() for _, d_in, _ in GROUPS]
    outs = [torch.zeros(tokens, sum(d_outs), dtype=torch.bfloat16) for _, _, d_outs in GROUPS]
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


def engine_rows(repeats: int) -> list[dict]:
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
        make_assets(root, s, torch.bfloat16)
        gate = GateRouter(s["hidden"], [f"a{i}" for i in range(NUM_ADAPTERS)], top_k=2)
        scenarios = {"a_base": lambda i: BaseSpec(), "b_adapter_per_request": lambda i: AdapterSpec(f"a{i % 4}"),
                     "c_gate_per_token": lambda i: GateSpec(gate)}
        for kernel in PREFILL_KERNELS:
            config = EngineConfig(max_batch=s["batch"], max_seq_len=2 * s["prompt"], hot_slots=NUM_ADAPTERS,
                                  max_rank=RANK, max_top_k=2, prefill_chunk=s["batch"] * s["prompt"],
                                  max_step_tokens=s["batch"] * (s["prompt"] + 1), backend="triton",
                                  prefill_kernel=kernel)
            engine = Engine(load_pretrained(root / "model", "bfloat16", "cpu"), config,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "prefill_host.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops: no OpenMP wake-ups in the way
    stub_kernels()
    rows = launcher_rows(args.repeats) + engine_rows(args.repeats)
    print(f"host time per prefill step, Triton LoRA launches stubbed out (CPU proxy), medians of {args.repeats}")
    print_table(rows, [("part", ""), ("scenario", ""), ("prefill_kernel", ""), ("host_ms", ".2f"), ("launches", "d")])
    write_json(args.out, {"benchmark": "prefill_host", "environment": environment("cpu"), "sizes": TINY,
                          "repeats": args.repeats, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
