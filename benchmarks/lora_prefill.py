"""Prefill-step LoRA cost of a whole decoder stack, run eagerly as the engine runs it: grouped against dense.

A prefill step runs eagerly (its shapes vary, and the grouped kernels read each adapter's token
count on the host), so what its LoRA costs is both the kernels' device time and the host time of
launching them. This times one prefill step's projections over `--layers` Qwen3-0.6B-shaped layers
(q/k/v, o, gate/up, down; every layer its own weights and adapters) for two routings of `--tokens`
tokens over 4 adapters: adapter per request (16 requests, each a contiguous run on one adapter,
top-1) and gate-like top-2. Variants:
  base           the base projections alone (one matmul per group),
  grouped        LoRA alone, prefill_kernel="grouped" (per module: shrink and expand over each
                 adapter's sorted tokens, plus zero-filled fp32 scratch and atomics for top-2),
  dense          LoRA alone, prefill_kernel="dense", what the default "auto" runs (the slot-dense
                 kernel over token tiles, two launches per group; only where the slots in use span
                 at most 2 x top-k, so the top-1 routing over 4 adapters falls back to grouped),
  base+grouped, base+dense   each group's base matmul then its LoRA, as a model runs them,
  base+dense_any_span        the same with `kernels.lora_dense` called for every step whatever
                 the span (top-1 over 4 adapters: 4x the routed LoRA FLOPs), to see where the
                 2 x top-k limit (chosen on CPU) should lie on a GPU.
For each: `wall_ms`, the step until the device is done (synchronized), and `issue_ms`, until the
host has queued every launch (the loop returning). issue close to wall means the step waits on
the host.

    python benchmarks/lora_prefill.py                 # CUDA
    TRITON_INTERPRET=1 python benchmarks/lora_prefill.py --device cpu --layers 1 --tokens 130 --repeats 1

Prints a table, writes JSON and ends with ``dense_vs_grouped_prefill: <grouped / dense wall time,
base included, gate-like top-2>``, ``dense_any_span_vs_grouped_prefill_top1: <the same for
adapter per request with dense_any_span>`` and ``prefill_lora_vs_base: <base+dense / base wall
time, gate-like top-2>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.lora_decode import DTYPES, GROUPS, make_layers  # noqa: E402
from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_dense import lora_dense  # noqa: E402
from kernels.meta import build_dispatch  # noqa: E402

NUM_ADAPTERS, RANK, REQUESTS = 4, 16, 16
VARIANTS = ("base", "grouped", "dense", "base+grouped", "base+dense", "base+dense_any_span")


def prefill_routings(tokens: int, device) -> dict:
    """Dispatch metadata of a prefill step: adapter per request (REQUESTS contiguous runs, top-1)
    and gate-like top-2 (distinct random adapters, softmax weights)."""
    gen = torch.Generator().manual_seed(1)
    per_request = (torch.arange(tokens) * REQUESTS // tokens % NUM_ADAPTERS).unsqueeze(1)
    top2 = torch.stack([torch.randperm(NUM_ADAPTERS, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
    return {
        "adapter_per_request": (per_request.int().to(device), torch.ones(tokens, 1, device=device)),
        "gate_top2": (top2.int().to(device), weights.to(device)),
    }


def step_fn(variant: str, layers, xs, outs, slots, weights):
    """One prefill step's projections over every layer. The dispatch metadata is built inside the
    step, as the engine builds it once per step (and its host read of the slot counts with it)."""
    base = variant.startswith("base")
    kernel = variant.rpartition("+")[2] if variant != "base" else None
    if kernel == "dense_any_span":
        def apply(x, lora_a, lora_b, ranks, scales, meta, outs):
            lora_dense(x, lora_a, lora_b, ranks, scales, meta, outs, slot_range=(0, NUM_ADAPTERS))
    else:
        apply = TritonBackend(prefill_kernel=kernel).apply_shared if kernel else None

    def step():
        meta = build_dispatch(slots, weights, NUM_ADAPTERS) if apply else None
        for layer in layers:
            for (_, _, d_outs), group, x, out in zip(GROUPS, layer, xs, outs):
                if base:
                    torch.matmul(x, group["weight"].T, out=out)
                if apply:
                    apply(x, group["lora_a"], group["lora_b"], group["ranks"], group["scales"], meta,
                          list(out.split(d_outs, dim=1)))

    return step


def time_step(step, device, repeats: int) -> tuple[float, float]:
    """(median wall ms, median issue ms) over `repeats` runs after two warm-ups (compiles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    walls, issues = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        issued = time.perf_counter()
        sync()
        walls.append(1e3 * (time.perf_counter() - started))
        issues.append(1e3 * (issued - started))
    return statistics.median(walls), statistics.median(issues)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the prefill step (the engine "
                        "benchmark's full size: 16 prompts of 256)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "lora_prefill.json"))
    args = parser.parse_args()
    if args.tokens < REQUESTS:
        parser.error(f"--tokens must be at least {REQUESTS} (one run per request)")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    layers = make_layers(args.layers, NUM_ADAPTERS, RANK, dtype, device)
    gen = torch.Generator(device=device).manual_seed(2)
    xs = [torch.randn(args.tokens, d_in, generator=gen, device=device).to(dtype) for _, d_in, _ in GROUPS]
    outs = [torch.zeros(args.tokens, sum(d_outs), device=device, dtype=dtype) for _, _, d_outs in GROUPS]

    rows, results = [], {}
    for routing, (slots, weights) in prefill_routings(args.tokens, device).items():
        for variant in VARIANTS:
            wall, issue = time_step(step_fn(variant, layers, xs, outs, slots, weights), device, args.repeats)
            results[f"{routing}/{variant}"] = {"wall_ms": wall, "issue_ms": issue}
            rows.append({"routing": routing, "variant": variant, "wall_ms": wall, "issue_ms": issue})
    print(f"device={device} dtype={args.dtype} layers={args.layers} tokens={args.tokens} rank={RANK} "
          f"adapters={NUM_ADAPTERS} repeats={args.repeats} (medians)")
    print_table(rows, [("routing", ""), ("variant", ""), ("wall_ms", ".2f"), ("issue_ms", ".2f")])
    gate = {v: results[f"gate_top2/{v}"]["wall_ms"] for v in VARIANTS}
    top1 = {v: results[f"adapter_per_request/{v}"]["wall_ms"] for v in VARIANTS}
    report = {
        "benchmark": "lora_prefill", "environment": environment(str(device)), "dtype": args.dtype,
        "layers": args.layers, "tokens": args.tokens, "rank": RANK, "adapters": NUM_ADAPTERS, "results": results,
        "dense_vs_grouped_prefill": gate["base+grouped"] / gate["base+dense"],
        "dense_any_span_vs_grouped_prefill_top1": top1["base+grouped"] / top1["base+dense_any_span"],
        "prefill_lora_vs_base": gate["base+dense"] / gate["base"],
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")
    print(f"dense_vs_grouped_prefill: {report['dense_vs_grouped_prefill']:.2f}")
    print(f"dense_any_span_vs_grouped_prefill_top1: {report['dense_any_span_vs_grouped_prefill_top1']:.2f}")
    print(f"prefill_lora_vs_base: {report['prefill_lora_vs_base']:.2f}")


if __name__ == "__main__":
    main()
