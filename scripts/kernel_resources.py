"""Compile the decode LoRA kernels for a GPU target without a GPU and report their resources.

For each decode kernel (fused, slot-dense, and slot-dense with the base projection) at
Qwen3-0.6B and 7B-class shapes, and the slot-dense kernel at prefill shapes (4096 tokens, token
tiles), the real launcher runs on CPU tensors with the Triton launch intercepted; the captured arguments are
compiled ahead of time for the target (sm_90 = H100 / H200 by default) with the same
specialization the JIT applies (pointers and integers divisible by 16 marked so), and the cubin's
resource usage is read with the cuobjdump that ships in Triton's wheel. It reports registers per
thread, spilled stack bytes, shared memory, and whether loads were software-pipelined (cp.async)
and which tensor-core instructions were emitted.

Nothing runs on a GPU: this is a static check of code generation (spills and unpipelined loops
are what it catches), not a timing. The Triton version here may differ from a GPU machine's.

    .venv/bin/python scripts/kernel_resources.py            # sm_90
    .venv/bin/python scripts/kernel_resources.py --arch 80  # A100
    .venv/bin/python scripts/kernel_resources.py --json rows.json   # also the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # a real compile, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.lora_dense as dense_module  # noqa: E402
import kernels.lora_dense_base as base_module  # noqa: E402
import kernels.lora_fused_decode as fused_module  # noqa: E402
from kernels.meta import DispatchBuffers  # noqa: E402

TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
         torch.int64: "*i64"}
# (name, T, K, S, R, D_in, D_outs)
SHAPES = [
    ("qwen3-0.6b q/k/v", 16, 2, 4, 16, 1024, (2048, 1024, 1024)),
    ("qwen3-0.6b down", 16, 2, 4, 16, 3072, (1024,)),
    ("7b gate/up", 16, 2, 4, 16, 4096, (14336, 14336)),
    ("7b gate/up, 64 x top-1, rank 64", 64, 1, 16, 64, 4096, (14336, 14336)),
]
# Prefill steps: only the slot-dense kernel takes them (with token tiles; the default call).
PREFILL_SHAPES = [
    ("qwen3-0.6b q/k/v, 4096 x top-2", 4096, 2, 4, 16, 1024, (2048, 1024, 1024)),
    ("7b q/k/v, 4096 x top-2", 4096, 2, 4, 16, 4096, (4096, 1024, 1024)),
]


class _Capture:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def captured_launches(modules, launcher, *args, **kwargs) -> list:
    """Run `launcher` with every Triton kernel of `modules` intercepted; returns its launches as
    (jit_fn, args, kwargs), in order."""
    launches = []
    kernels = [(module, name, fn) for module in modules for name, fn in vars(module).items()
               if isinstance(fn, triton.runtime.jit.JITFunction)]
    for module, name, fn in kernels:
        setattr(module, name, _Capture(fn, launches))
    try:
        launcher(*args, **kwargs)
    finally:
        for module, name, fn in kernels:
            setattr(module, name, fn)
    return launches


def compile_launch(fn, args, kwargs, target: GPUTarget):
    """Compile one captured launch for `target` as the JIT would specialize it."""
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    params = fn.arg_names
    constexpr_names = {params[i] for i in fn.constexprs}
    values = dict(zip([p for p in params if p not in constexpr_names], args))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(params):
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[(i,)] = kwargs[name]
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = TYPES[value.dtype]
            divisible = True  # allocations are 16-byte aligned; views at offset 0 here
        else:
            signature[name] = "i32"
            divisible = value != 0 and value % 16 == 0
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options)
    return compiled, {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}, options


def resources(compiled) -> dict:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    field = lambda key: int(line.split(f"{key}:")[1].split()[0])  # noqa: E731
    ptx = compiled.asm["ptx"]
    return {"regs": field("REG"), "spill_bytes": field("STACK"), "shared_bytes": compiled.metadata.shared,
            "pipelined": "cp.async" in ptx, "mma": "wgmma" if "wgmma.mma_async" in ptx else
            ("mma.sync" if "mma.sync" in ptx else "none")}


def problem(tokens, top_k, slots, rank, d_in, d_outs, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    lora_a = torch.zeros(len(d_outs), slots, rank, d_in, dtype=dtype)
    lora_b = [torch.zeros(slots, d, rank, dtype=dtype) for d in d_outs]
    ranks = torch.full((len(d_outs), slots), rank, dtype=torch.int32)
    scales = torch.ones(len(d_outs), slots)
    routes = torch.stack([torch.randperm(slots, generator=gen)[:top_k] for _ in range(tokens)]).int()
    meta = DispatchBuffers(tokens, top_k, slots).build(routes, torch.full((tokens, top_k), 1.0 / top_k))
    out = torch.zeros(tokens, sum(d_outs), dtype=dtype)
    return x, lora_a, lora_b, ranks, scales, meta, list(out.split(list(d_outs), dim=1))


def dense_base(x, lora_a, lora_b, ranks, scales, meta, outs, **options):
    """`lora_dense_base` on `problem`'s arguments, with base weights of their shapes (no bias)."""
    weights = [torch.empty(out.shape[1], x.shape[1], dtype=x.dtype) for out in outs]
    return base_module.lora_dense_base(x, weights, None, lora_a, lora_b, ranks, scales, meta, outs, **options)


# Shared memory a program may opt in to, by compute capability x 10 (CUDA's documented limits):
# what `lora_dense_base` sizes its pipeline by on such a device.
OPTIN_SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# (call, the modules whose kernels it launches, launcher, options)
KERNELS = [("fused", [fused_module], fused_module.lora_fused_decode, {}),
           ("dense", [dense_module], dense_module.lora_dense, {}),  # split-K from D_in 1024 (default_split_k)
           ("dense split_k=1", [dense_module], dense_module.lora_dense, {"split_k": 1}),
           ("dense_base", [base_module], dense_base, {}),
           ("dense_base split_k=4", [base_module, dense_module], dense_base, {"split_k": 4})]


def report(arch: int = 90, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per compiled kernel of each call in KERNELS at each of SHAPES, and of the dense
    kernel's default call at each of PREFILL_SHAPES."""
    target = GPUTarget("cuda", arch, 32)
    # The launchers see CPU tensors: lora_dense_base reads the target's shared memory instead.
    shared_memory = base_module._shared_memory
    base_module._shared_memory = lambda device: OPTIN_SHARED_MEMORY.get(arch, 0)
    try:
        return _report(target, dtype)
    finally:
        base_module._shared_memory = shared_memory


def _report(target: GPUTarget, dtype: torch.dtype) -> list[dict]:
    rows = []
    calls = [(shape, "decode", KERNELS) for shape in SHAPES]
    calls += [(shape, "prefill", KERNELS[1:2]) for shape in PREFILL_SHAPES]
    for (name, tokens, top_k, slots, rank, d_in, d_outs), step, kernels in calls:
        for call, modules, launcher, options in kernels:
            problem_args = problem(tokens, top_k, slots, rank, d_in, d_outs, dtype)
            for fn, launch_args, launch_kwargs in captured_launches(modules, launcher, *problem_args, **options):
                if "DOT_FP32" in launch_kwargs:  # the launcher saw CPU tensors; on CUDA only fp32 upcasts
                    launch_kwargs["DOT_FP32"] = dtype == torch.float32
                compiled, tiles, launch = compile_launch(fn, launch_args, dict(launch_kwargs), target)
                rows.append({"shape": name, "step": step, "call": call, "kernel": fn.__name__, **resources(compiled),
                             "tiles": " ".join(f"{k}={v}" for k, v in {**tiles, **launch}.items())})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100 / H200)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = report(args.arch, getattr(torch, args.dtype))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"compiled for sm_{args.arch} by triton {triton.__version__}, {args.dtype}, default tiles (not run)")
    print(f"{'shape':<34}{'call':<22}{'kernel':<28}{'regs':>6}{'spill B':>9}{'smem B':>9}{'pipelined':>11}"
          f"{'mma':>10}  tiles")
    for r in rows:
        print(f"{r['shape']:<34}{r['call']:<22}{r['kernel']:<28}{r['regs']:>6}{r['spill_bytes']:>9}"
              f"{r['shared_bytes']:>9}{str(r['pipelined']):>11}{r['mma']:>10}  {r['tiles']}")


if __name__ == "__main__":
    main()
