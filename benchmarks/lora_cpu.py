"""The CPU backend's compiled LoRA kernel against the torch twins, over a 4-layer decoder stack.

Per step, every layer's four projection groups (q/k/v, o, gate/up, down), each with its own
weights for 4 rank-16 adapters, fp32 (or `--dtype`), through:
  twin    the torch twins (`kernels.lora_ref.lora_apply_shared_ref`), what the CPU backend runs
          above `kernels.lora_cpu.MAX_PAIRS` (token, choice) pairs,
  kernel  the compiled kernel (`kernels/csrc/lora_cpu.cpp`, `lora_cpu.run_prepared`).
Routings: `request` (contiguous runs of tokens on one adapter each, top-1: one adapter per
request) and `token` (a distinct top-k of the 4 adapters per token, as a gate routes). Rows
marked cold read a 48 MB buffer before each group call (untimed), as a decode step's base
weights evict the adapters between two calls; the others run on warm caches.

    .venv/bin/python benchmarks/lora_cpu.py            # both shapes, under two minutes on 2 cores
    .venv/bin/python benchmarks/lora_cpu.py --dtype bfloat16 --out benchmarks/out/lora_cpu-bf16.json

Prints a table, writes JSON and ends with ``kernel_vs_twin_decode: <twin / kernel>`` (16 tokens,
top-2, cold, hidden 256) and ``max_pairs: <kernels.lora_cpu.MAX_PAIRS>`` (the fp32 limit; see
`kernels.lora_cpu.takes` for the others).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from kernels import build_dispatch, cpu_ext, lora_cpu  # noqa: E402
from kernels.lora_ref import lora_apply_shared_ref  # noqa: E402

# (D_in, D_out of each member) per group: the engine benchmark's quick model, and Qwen3-0.6B's
# layer shapes (head_dim 128).
SHAPES = {
    "hidden256": [(256, (256, 128, 128)), (256, (256,)), (256, (768, 768)), (768, (256,))],
    "qwen3-0.6b": [(1024, (2048, 1024, 1024)), (2048, (1024,)), (1024, (3072, 3072)), (3072, (1024,))],
}
LAYERS, ADAPTERS, RANK = 4, 4, 16
# (tokens, top_k, routing, cold)
CASES = [(16, 1, "request", True), (16, 2, "token", True), (16, 2, "token", False), (64, 2, "token", False),
         (256, 1, "request", False), (256, 2, "token", False), (512, 1, "request", False),
         (512, 2, "token", False), (1024, 1, "request", False), (1024, 2, "token", False),
         (2048, 1, "request", False)]


def make_stack(groups, tokens: int, gen: torch.Generator, dtype: torch.dtype):
    """Per layer and group: x, lora_a [G, S, R, D_in], lora_b (G tensors [S, R, D_out]), and the
    [T, sum D_out] output."""
    stack = []
    for _ in range(LAYERS):
        for d_in, d_outs in groups:
            stack.append(dict(
                x=torch.randn(tokens, d_in, generator=gen).to(dtype),
                a=(torch.randn(len(d_outs), ADAPTERS, RANK, d_in, generator=gen) / d_in**0.5).to(dtype),
                b=[(torch.randn(ADAPTERS, RANK, n, generator=gen) / RANK).to(dtype) for n in d_outs],
                out=torch.zeros(tokens, sum(d_outs), dtype=dtype), sizes=list(d_outs),
            ))
    return stack


def routing(tokens: int, top_k: int, kind: str, gen: torch.Generator):
    if kind == "request":
        slots = (torch.arange(tokens) * ADAPTERS // tokens).view(-1, 1).repeat(1, top_k)
    else:
        slots = torch.stack([torch.randperm(ADAPTERS, generator=gen)[:top_k] for _ in range(tokens)])
    return build_dispatch(slots.int(), torch.softmax(torch.randn(tokens, top_k, generator=gen), -1), ADAPTERS)


def step_calls(stack, meta, impl: str):
    """One callable per group call of the step."""
    ranks, scales = torch.full((3, ADAPTERS), RANK, dtype=torch.int32), torch.full((3, ADAPTERS), 2.0)
    calls = []
    for layer in stack:
        g = layer["a"].shape[0]
        outs = list(layer["out"].split(layer["sizes"], 1))
        args = (layer["x"], layer["a"], [b.transpose(1, 2) for b in layer["b"]], ranks[:g].contiguous(),
                scales[:g].contiguous())
        if impl == "twin":
            calls.append(lambda args=args, outs=outs: lora_apply_shared_ref(*args, meta, outs))
        else:
            prepared, routes = lora_cpu.Prepared.make(*args[1:]), lora_cpu.step_routes(meta)
            calls.append(lambda x=args[0], p=prepared, outs=outs: lora_cpu.run_prepared(x, p, routes, outs, meta.top_k))
    return calls


def time_step(calls, flush: torch.Tensor | None) -> float:
    """Seconds of one step's group calls (a flush before each, untimed, where given)."""
    total = 0.0
    for call in calls:
        if flush is not None:
            flush.sum()
        started = time.perf_counter()
        call()
        total += time.perf_counter() - started
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (median kept)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "lora_cpu.json"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not lora_cpu.available():
        sys.exit("the compiled CPU kernel could not be built here (see the log): nothing to time")
    flush = torch.randn(12 * 2**20)  # 48 MB
    rows = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            for tokens, top_k, kind, cold in CASES:
                gen = torch.Generator().manual_seed(tokens * 10 + top_k)
                stack, meta = make_stack(SHAPES[shape], tokens, gen, dtype), routing(tokens, top_k, kind, gen)
                calls = {impl: step_calls(stack, meta, impl) for impl in ("twin", "kernel")}
                times = {impl: [] for impl in calls}
                for impl in calls:
                    time_step(calls[impl], None)  # warm-up
                for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
                    for impl in calls:
                        times[impl].append(time_step(calls[impl], flush if cold else None))
                twin, kernel = (sorted(times[i])[len(times[i]) // 2] * 1e3 for i in ("twin", "kernel"))
                rows.append(dict(shape=shape, tokens=tokens, top_k=top_k, routing=kind, pairs=tokens * top_k,
                                 cold=cold, twin_ms=twin, kernel_ms=kernel, speedup=twin / kernel))
    takes = {"float32": f"steps of up to MAX_PAIRS = {lora_cpu.MAX_PAIRS} pairs",
             "bfloat16": f"group calls of up to MAX_MACS_BF16 = {lora_cpu.MAX_MACS_BF16 / 2**20:g}M multiply-adds"
                         if cpu_ext.native_dots(torch.bfloat16) else "every call (this CPU has no bf16 dot products)",
             "float16": "every call"}[args.dtype]
    print(f"{LAYERS} layers x 4 groups, {ADAPTERS} adapters, rank {RANK}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; the backend runs the kernel for {takes}")
    print_table(rows, [("shape", ""), ("tokens", "d"), ("top_k", "d"), ("routing", ""), ("pairs", "d"),
                       ("cold", ""), ("twin_ms", ".3f"), ("kernel_ms", ".3f"), ("speedup", ".2f")])
    headline = next((r["speedup"] for r in rows
                     if (r["shape"], r["tokens"], r["top_k"], r["cold"]) == ("hidden256", 16, 2, True)), None)
    write_json(args.out, {"benchmark": "lora_cpu", "environment": environment("cpu"), "dtype": args.dtype,
                          "rows": rows, "kernel_vs_twin_decode": headline, "max_pairs": lora_cpu.MAX_PAIRS,
                          "max_macs_bf16": lora_cpu.MAX_MACS_BF16 if cpu_ext.native_dots(torch.bfloat16) else None})
    print(f"wrote {args.out}")
    print("kernel_vs_twin_decode: " + ("n/a (hidden256 not run)" if headline is None else f"{headline:.2f}"))
    print(f"max_pairs: {lora_cpu.MAX_PAIRS}")


if __name__ == "__main__":
    main()
