"""Per-token MoLoRA vs per-sequence routing for one LoRA linear layer.

For T tokens spread over K adapter types, times in one run:
  (a) base   the base projection alone,
  (b) molora per-token MoLoRA in one pass (every token to its own adapter),
  (c) k_pass per-sequence routing as K passes (each pass runs the whole batch through base + one
             adapter and keeps its own tokens), what a per-sequence server does for a batch that
             needs K specialists,
  (d) single one adapter for all tokens.
The dispatch metadata is built once per step and shared by every layer, so it is timed apart
(`dispatch_ms`), not inside (b).

    python benchmarks/lora_layer.py --quick        # CPU (D=2048, T up to 1024), under a minute
    python benchmarks/lora_layer.py                # real shapes (D=4096, T up to 4096), for a GPU

Prints a table, writes JSON (device, versions, command) and ends with
`per_token_speedup_k4: <(c)/(b) at K=4>` and `lora_overhead: <(b)/(a)>` at the default shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians_ms, median_ms, print_table, write_json  # noqa: E402
from kernels import build_dispatch, default_backend_name, get_backend  # noqa: E402
from molora_core.hotset import HotSet  # noqa: E402
from molora_core.lora_layer import LoRAContext, MoLoRALinear  # noqa: E402
from molora_core.adapter import LoRAAdapter, LoRAModule  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_layer(d: int, num_adapters: int, rank: int, dtype, device, backend: str):
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, bias=False, dtype=dtype, device=device)
    hotset = HotSet({"proj": (d, d)}, num_slots=num_adapters, max_rank=rank, dtype=dtype, device=device)
    dense = []
    for i in range(num_adapters):
        a = torch.randn(rank, d, dtype=dtype) * 0.02
        b = torch.randn(d, rank, dtype=dtype) * 0.02
        hotset.load(f"a{i}", LoRAAdapter(f"a{i}", {"proj": LoRAModule(a, b, 2.0)}))
        dense.append((a.to(device), b.to(device), 2.0))
    layer = MoLoRALinear(base, hotset.buffers["proj"], LoRAContext(get_backend(backend)))
    return layer, dense


def measure(layer, dense, num_tokens: int, k: int, d: int, dtype, device, repeats: int) -> dict:
    x = torch.randn(num_tokens, d, dtype=dtype, device=device)
    # Token t goes to adapter t % K: K adapter types interleaved, as in a multimodal batch.
    choice = torch.arange(num_tokens, device=device) % k
    slots = choice.to(torch.int32).unsqueeze(1)
    ones = torch.ones(num_tokens, 1, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    ctx = layer.context

    dispatch_ms = median_ms(lambda: build_dispatch(slots, ones, layer.buffers.slot_ranks.numel()), repeats, sync=sync)
    meta_mixed = build_dispatch(slots, ones, layer.buffers.slot_ranks.numel())
    meta_single = build_dispatch(torch.zeros_like(slots), ones, layer.buffers.slot_ranks.numel())
    masks = [choice == i for i in range(k)]

    def base():
        return layer.base(x)

    def molora(meta):
        def run():
            ctx.meta = meta
            return layer(x)

        return run

    def k_pass():
        out = torch.empty(num_tokens, d, dtype=dtype, device=device)
        for i in range(k):
            a, b, scale = dense[i]
            y = layer.base(x) + scale * ((x @ a.T) @ b.T)
            out[masks[i]] = y[masks[i]]
        return out

    with torch.no_grad():
        # The three ways must agree before their times mean anything.
        reference = k_pass()
        torch.testing.assert_close(molora(meta_mixed)(), reference, **_tolerance(dtype))
        timed = interleaved_medians_ms(
            {"base_ms": base, "molora_ms": molora(meta_mixed), "k_pass_ms": k_pass, "single_ms": molora(meta_single)},
            repeats,
            sync=sync,
        )
    row = {"T": num_tokens, "K": k, "dispatch_ms": dispatch_ms, **timed}
    row["per_token_speedup"] = row["k_pass_ms"] / row["molora_ms"]
    row["lora_overhead"] = row["molora_ms"] / row["base_ms"]
    return row


def _tolerance(dtype):
    return {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized shapes, under a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="torch or triton (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/out/lora_layer-<device>.json)")
    args = parser.parse_args(argv)

    device = args.device
    backend = args.backend or default_backend_name(device)
    if args.quick:
        d, token_counts, repeats = 2048, [16, 128, 1024], args.repeats or 11
        dtype = DTYPES[args.dtype or "float32"]
    else:
        d, token_counts, repeats = 4096, [16, 256, 1024, 4096], args.repeats or 50
        dtype = DTYPES[args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")]
    default_t = token_counts[-1]

    rows = []
    for k in (1, 2, 4):
        layer, dense = make_layer(d, max(k, 1), args.rank, dtype, device, backend)
        for num_tokens in token_counts:
            rows.append(measure(layer, dense, num_tokens, k, d, dtype, device, repeats))

    print(f"LoRA layer D={d} R={args.rank} dtype={str(dtype).removeprefix('torch.')} device={device} backend={backend}")
    print_table(
        rows,
        [("T", ""), ("K", ""), ("dispatch_ms", ".3f"), ("base_ms", ".3f"), ("molora_ms", ".3f"),
         ("k_pass_ms", ".3f"), ("single_ms", ".3f"), ("per_token_speedup", ".2f"), ("lora_overhead", ".3f")],
    )
    headline = next(r for r in rows if r["K"] == 4 and r["T"] == default_t)
    result = {
        "benchmark": "lora_layer",
        "shape": {"D": d, "R": args.rank, "dtype": str(dtype), "default_T": default_t},
        "backend": backend,
        "environment": environment(device),
        "rows": rows,
        "per_token_speedup_k4": headline["per_token_speedup"],
        "lora_overhead": headline["lora_overhead"],
    }
    tag = "cpu" if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    out = write_json(args.out or Path(__file__).parent / "out" / f"lora_layer-{tag}.json", result)
    print(f"wrote {out}")
    print(f"per_token_speedup_k4: {result['per_token_speedup_k4']:.2f}")
    print(f"lora_overhead: {result['lora_overhead']:.3f}")
    return result


if __name__ == "__main__":
    main()
