"""Decode-step LoRA cost of a whole decoder stack, as CUDA graphs replay it: split, fused and dense kernels.

One decode step's LoRA work is a rank-16 product per (token, choice), so on a GPU it costs what
its launches cost. This times, per decode step over `--layers` layers of a Qwen3-0.6B-shaped
decoder (q/k/v, o, gate/up, down), captured in one CUDA graph each and replayed:
  base   the base projections alone (one matmul per group: q/k/v fused, o, gate/up fused, down),
  split  separate shrink and expand launches (14 per layer; decode_kernel="split"),
  fused  the fused decode kernel for every group (one launch per group of up to 3 modules: 4),
  dense  the slot-dense decode kernel for every group (4 launches, tensor-core dots),
  auto   the Triton backend's LoRA alone, after a caller's matmul (`apply_shared` with
         decode_kernel="auto": the dense kernel for bf16/fp16, fused or split per group for fp32),
  base+auto    the base matmul, then auto, per group (decode_kernel="dense" in the engine),
  dense_base   the base projection and the slot-dense LoRA in one launch per group
         (`kernels.lora_dense_base`): the engine's projections on bf16/fp16 decode steps
         (decode_kernel="auto" or "dense_base").
Every layer has its own weights and adapters (as in a model), for two routings of 16 tokens:
adapter per request (top-1 of 4 adapters) and gate-like top-2 of 4.

    python benchmarks/lora_decode.py                 # CUDA
    python benchmarks/lora_decode.py --sweep         # CUDA, plus the fused, dense and dense_base kernels'
                                                     # tile sweeps (dense and dense_base also try split-K)
    TRITON_INTERPRET=1 python benchmarks/lora_decode.py --device cpu --layers 1 --repeats 1   # smoke run

Prints a table, writes JSON and ends with ``auto_vs_split_decode: <split / auto LoRA time>``,
``auto_lora_vs_base: <auto LoRA time / base time>``, ``auto_vs_fused_decode: <fused / auto
LoRA time>`` and ``dense_base_vs_base_plus_auto: <base+auto / dense_base time>`` (gate-like
routing).
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
from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_dense import lora_dense  # noqa: E402
from kernels.lora_dense_base import lora_dense_base  # noqa: E402
from kernels.lora_fused_decode import lora_fused_decode  # noqa: E402
from kernels.meta import DispatchBuffers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (name, D_in, D_out of each member): Qwen3-0.6B's projections at head_dim 64 (the engine benchmark's).
GROUPS = [("qkv", 1024, (1024, 512, 512)), ("o", 1024, (1024,)), ("gate_up", 1024, (3072, 3072)),
          ("down", 3072, (1024,))]
# A 7B-class layer (Llama / Mistral / Qwen2 7B shapes), for where the fused kernel's recomputed
# shrink (once per output tile) starts to cost more than the launch it saves.
GROUPS_7B = [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)), ("gate_up", 4096, (14336, 14336)),
             ("down", 14336, (4096,))]
SHAPES = {"qwen3-0.6b": GROUPS, "7b": GROUPS_7B}


def make_layers(num_layers, num_adapters, rank, dtype, device, groups=GROUPS, base=True):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    layers = []
    for _ in range(num_layers):
        layer = []
        for _, d_in, d_outs in groups:
            layer.append({
                "weight": rand(sum(d_outs), d_in, scale=d_in**-0.5) if base else None,
                "lora_a": rand(len(d_outs), num_adapters, rank, d_in, scale=d_in**-0.5),
                "lora_b": [rand(num_adapters, d, rank, scale=rank**-0.5) for d in d_outs],
                "ranks": torch.full((len(d_outs), num_adapters), rank, dtype=torch.int32, device=device),
                "scales": torch.full((len(d_outs), num_adapters), 2.0, dtype=torch.float32, device=device),
            })
        layers.append(layer)
    return layers


def routings(num_tokens, num_adapters, device):
    gen = torch.Generator().manual_seed(1)
    per_request = torch.stack([torch.arange(num_tokens) % num_adapters, torch.full((num_tokens,), -1)], dim=1)
    top2 = torch.stack([torch.randperm(num_adapters, generator=gen)[:2] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, 2, generator=gen), dim=-1)
    return {
        "adapter_per_request": (per_request.int().to(device), torch.tensor([[1.0, 0.0]] * num_tokens, device=device)),
        "gate_top2": (top2.int().to(device), weights.to(device)),
    }


def top_k_meta(tokens, top_k, num_adapters, device, seed):
    """Dispatch metadata of a decode step: each token on `top_k` distinct random adapters, equal
    weights, tile height fixed as in a captured step (no host read)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(num_adapters, generator=gen)[:top_k] for _ in range(tokens)])
    meta = DispatchBuffers(tokens, top_k, num_adapters, device=device).build(
        slots.int().to(device), torch.full((tokens, top_k), 1.0 / top_k, device=device))
    meta.block_m = 16
    return meta


def step_fn(variant, layers, xs, outs, meta, groups=GROUPS):
    """One decode step's projections over every layer (the inputs are the same for every layer:
    what is timed is the work, not the values)."""
    base = variant in ("base", "base+auto")
    kernel = {"base": None, "base+auto": "auto"}.get(variant, variant)
    backend = kernel and TritonBackend(decode_kernel=kernel)

    def step():
        for layer in layers:
            for (_, _, d_outs), group, x, out in zip(groups, layer, xs, outs):
                lora = (group["lora_a"], group["lora_b"], group["ranks"], group["scales"], meta)
                if kernel == "dense_base":  # writes a new [T, sum D_out] (from the graph's pool)
                    backend.base_and_apply_shared(x, group["weight"], None, list(d_outs), *lora)
                    continue
                if base:
                    torch.matmul(x, group["weight"].T, out=out)
                if backend:
                    backend.apply_shared(x, *lora, list(out.split(d_outs, dim=1)))

    return step


VARIANTS = ("split", "fused", "dense", "auto")
# Base projections and LoRA together: apart (the engine's default), and in one launch per group.
BASE_VARIANTS = ("base+auto", "dense_base")
# Tile sizes and launch options each kernel's sweep tries (rank 16: fused lora_a tiles up to 16 x 512).
SWEEPS = {
    "fused": (lora_fused_decode,
              [dict(block_k=k, block_n=n, num_warps=w) for k in (128, 256, 512) for n in (128, 256) for w in (4, 8)]),
    # scripts/kernel_resources.py (sm_90, bf16): 2 warps, 256-wide K steps, and 256-wide output
    # tiles with 4 warps spill registers at these shapes; the rest do not.
    # Those pin the one-launch form (split_k=1); then split_k from 1 to 16 at the default tiles
    # (k > 1: a split-K shrink launch, then the expand).
    "dense": (lora_dense,
              [dict(block_k=k, block_n=n, num_warps=w, split_k=1) for k in (64, 128) for n in (32, 64, 128, 256)
               for w in (4, 8) if n < 256 or w == 8] + [dict(split_k=k) for k in (1, 2, 4, 8, 16)]),
    # The base projection with its LoRA (its layers carry base weights): output tiles and warps in
    # the one-launch form, its K steps and pipeline depth, then a split-K shrink launch first, at
    # the default tiles and at other output tiles (the base loop then reads no lora_a, so narrow
    # tiles cost no extra reads).
    "dense_base": (lora_dense_base,
                   [dict(block_n=n, num_warps=w) for n in (16, 32, 64, 128) for w in (4, 8)]
                   + [dict(block_k=k) for k in (64, 256)] + [dict(num_stages=n) for n in (2, 4, 5)]
                   + [dict(split_k=k) for k in (2, 4, 8)] + [dict(split_k=4, block_n=n) for n in (16, 64, 128)]),
}


def sweep_kernel(kernel, settings, layers_g, groups, tokens, top_k, num_adapters, dtype, device, repeats):
    """Per group at `tokens` x `top_k`, one row as each group finishes: `kernel`'s time with its
    default tiles and with each of `settings`, and the best of them."""
    meta = top_k_meta(tokens, top_k, num_adapters, device, seed=3)
    for i, (name, d_in, d_outs) in enumerate(groups):
        x = torch.randn(tokens, d_in, device=device).to(dtype)
        out = torch.zeros(tokens, sum(d_outs), device=device, dtype=dtype)
        outs = list(out.split(d_outs, dim=1))

        # lora_dense_base also takes each layer's base weights (split per module once, here).
        weights = [list(layer[i]["weight"].split(d_outs)) for layer in layers_g] if kernel is lora_dense_base else None

        def step_with(blocks, i=i, x=x, outs=outs, weights=weights):
            def step():
                for n, layer in enumerate(layers_g):
                    g = layer[i]
                    lora = (g["lora_a"], g["lora_b"], g["ranks"], g["scales"], meta, outs)
                    if weights is None:
                        kernel(x, *lora, **blocks)
                    else:
                        kernel(x, weights[n], None, *lora, **blocks)
            return step

        default_ms = time_graph(step_with({}), repeats, device)
        timed = [(time_graph(step_with(blocks), repeats, device), blocks) for blocks in settings]
        best_ms, best = min(timed, key=lambda t: t[0])
        yield {"group": name, "d_in": d_in, "d_outs": list(d_outs), "default_ms": default_ms,
               "best_ms": best_ms, "best": best, "speedup": default_ms / best_ms,
               "all": [{"ms": ms, **blocks} for ms, blocks in timed]}


def time_graph(step, repeats, device):
    """Median ms of one step: a CUDA graph replay on CUDA, an eager call elsewhere."""
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-per-group", action="store_true", help="only the whole-layer table")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the fused, dense and dense_base kernels per group over tile sizes and warps (SWEEPS)")
    parser.add_argument("--sweep-kernels", default=",".join(SWEEPS), metavar="KERNELS",
                        help=f"comma-separated kernels --sweep times (default: all of {', '.join(SWEEPS)})")
    parser.add_argument("--sweep-shapes", default="qwen3-0.6b,7b", metavar="SHAPES",
                        help="comma-separated shapes --sweep times: qwen3-0.6b, 7b (default: both)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "lora_decode.json"))
    args = parser.parse_args(argv)
    sweep_kernels, sweep_shapes = args.sweep_kernels.split(","), args.sweep_shapes.split(",")
    if set(sweep_kernels) - set(SWEEPS) or set(sweep_shapes) - set(SHAPES):
        parser.error(f"--sweep-kernels takes {sorted(SWEEPS)}, --sweep-shapes {sorted(SHAPES)}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]

    layers = make_layers(args.layers, args.adapters, args.rank, dtype, device)
    xs = [torch.randn(args.tokens, d_in, device=device).to(dtype) for _, d_in, _ in GROUPS]
    outs = [torch.zeros(args.tokens, sum(d_outs), device=device, dtype=dtype) for _, _, d_outs in GROUPS]
    buffers = DispatchBuffers(args.tokens, 2, args.adapters, device=device)
    rows = []
    with torch.no_grad():
        base_ms = time_graph(step_fn("base", layers, xs, outs, None), args.repeats, device)
        for name, (slots, weights) in routings(args.tokens, args.adapters, device).items():
            meta = buffers.build(slots, weights)
            meta.block_m = 16  # as in a captured step: no host read
            assert meta.is_decode
            # The variants must agree before their times mean anything.
            results = []
            for variant in VARIANTS:
                for out in outs:
                    out.zero_()
                step_fn(variant, layers[:1], xs, outs, meta)()
                results.append([out.float().clone() for out in outs])
            for other in results[1:]:
                for a, b in zip(other, results[0]):
                    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
            # The fused base and LoRA against the matmul, then auto (one layer's outputs).
            step_fn("base+auto", layers[:1], xs, outs, meta)()
            with_base = TritonBackend(decode_kernel="dense_base")
            for (_, _, d_outs), group, x, out in zip(GROUPS, layers[0], xs, outs):
                y = with_base.base_and_apply_shared(x, group["weight"], None, list(d_outs), group["lora_a"],
                                                    group["lora_b"], group["ranks"], group["scales"], meta)
                torch.testing.assert_close(y.float(), out.float(), rtol=2e-2, atol=2e-2 * float(out.abs().max()))
            ms = {variant: time_graph(step_fn(variant, layers, xs, outs, meta), args.repeats, device)
                  for variant in (*VARIANTS, *BASE_VARIANTS)}
            rows.append({"routing": name, "base_ms": base_ms,
                         **{f"{v}_ms": ms[v] for v in (*VARIANTS, *BASE_VARIANTS)},
                         "auto_vs_split": ms["split"] / ms["auto"], "auto_vs_fused": ms["fused"] / ms["auto"],
                         "split_vs_base": ms["split"] / base_ms, "auto_vs_base": ms["auto"] / base_ms,
                         "dense_base_vs_base_plus_auto": ms["base+auto"] / ms["dense_base"]})

    per_group, sweep = [], []

    def save() -> dict:
        """Write what is measured so far (a run stopped by a time limit keeps its finished parts)."""
        headline = rows[-1]
        result = {
            "benchmark": "lora_decode",
            "shape": {"groups": GROUPS, "tokens": args.tokens, "layers": args.layers, "adapters": args.adapters,
                      "rank": args.rank, "dtype": str(dtype)},
            "environment": environment(str(device)),
            "rows": rows,
            "per_group": per_group,
            "sweep": sweep,
            "auto_vs_split_decode": headline["auto_vs_split"],
            "auto_lora_vs_base": headline["auto_vs_base"],
            "auto_vs_fused_decode": headline["auto_vs_fused"],
            "dense_base_vs_base_plus_auto": headline["dense_base_vs_base_plus_auto"],
        }
        write_json(args.out, result)
        return result

    save()
    # Per group, across shapes and step sizes: where fusing stops paying.
    if not args.skip_per_group:
        with torch.no_grad():
            for shapes_name, groups in SHAPES.items():
                layers_g = make_layers(args.layers, args.adapters, args.rank, dtype, device, groups, base=False)
                for tokens, top_k in ((16, 2), (64, 1)):
                    meta = top_k_meta(tokens, top_k, args.adapters, device, seed=2)
                    for i, (name, d_in, d_outs) in enumerate(groups):
                        x = [torch.randn(tokens, d_in, device=device).to(dtype)]
                        out = [torch.zeros(tokens, sum(d_outs), device=device, dtype=dtype)]
                        only = [[layer[i]] for layer in layers_g]
                        times = {variant: time_graph(step_fn(variant, only, x, out, meta, [groups[i]]), args.repeats,
                                                     device) for variant in ("split", "fused", "dense")}
                        per_group.append({"shapes": shapes_name, "group": name, "tokens": tokens, "top_k": top_k,
                                          **{f"{v}_ms": t for v, t in times.items()},
                                          "fused_vs_split": times["split"] / times["fused"],
                                          "dense_vs_split": times["split"] / times["dense"]})
                        save()
                del layers_g

    if args.sweep:
        with torch.no_grad():
            for shapes_name in sweep_shapes:
                groups = SHAPES[shapes_name]
                layers_g = make_layers(args.layers, args.adapters, args.rank, dtype, device, groups)
                for kernel_name in sweep_kernels:
                    kernel, settings = SWEEPS[kernel_name]
                    for row in sweep_kernel(kernel, settings, layers_g, groups, 16, 2, args.adapters, dtype, device,
                                            args.repeats):
                        sweep.append({"kernel": kernel_name, "shapes": shapes_name, **row})
                        save()
                del layers_g

    print(f"LoRA per decode step: {args.layers} layers, {args.tokens} tokens, {args.adapters} adapters, "
          f"rank {args.rank}, {str(dtype).removeprefix('torch.')}, device={device}"
          + (" (CUDA graph replays)" if device.type == "cuda" else " (eager; not a GPU timing)"))
    print_table(rows, [("routing", ""), ("base_ms", ".3f"), ("split_ms", ".3f"), ("fused_ms", ".3f"),
                       ("dense_ms", ".3f"), ("auto_ms", ".3f"), ("base+auto_ms", ".3f"), ("dense_base_ms", ".3f"),
                       ("auto_vs_split", ".2f"), ("auto_vs_fused", ".2f"), ("auto_vs_base", ".2f"),
                       ("dense_base_vs_base_plus_auto", ".2f")])
    if per_group:
        print(f"Per group ({args.layers} layers of that projection group only):")
        print_table(per_group, [("shapes", ""), ("group", ""), ("tokens", ""), ("top_k", ""), ("split_ms", ".3f"),
                                ("fused_ms", ".3f"), ("dense_ms", ".3f"), ("fused_vs_split", ".2f"),
                                ("dense_vs_split", ".2f")])
    if sweep:
        print("Kernel tiles, 16 tokens x top-2 (best of the sweep against the default tiles):")
        print_table([{**r, "best": " ".join(f"{k}={v}" for k, v in r["best"].items())} for r in sweep],
                    [("kernel", ""), ("shapes", ""), ("group", ""), ("default_ms", ".3f"), ("best_ms", ".3f"),
                     ("speedup", ".2f"),
                     ("best", "")])
    result = save()
    out = args.out
    print(f"wrote {out}")
    print(f"auto_vs_split_decode: {result['auto_vs_split_decode']:.2f}")
    print(f"auto_lora_vs_base: {result['auto_lora_vs_base']:.2f}")
    print(f"auto_vs_fused_decode: {result['auto_vs_fused_decode']:.2f}")
    print(f"dense_base_vs_base_plus_auto: {result['dense_base_vs_base_plus_auto']:.2f}")
    return result


if __name__ == "__main__":
    main()
