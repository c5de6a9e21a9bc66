"""The CPU backend's compiled LoRA kernel (`kernels/csrc/lora_cpu.cpp`): its launcher.

Semantics as `kernels.lora_ref.lora_apply_shared_ref`, its oracle:

    outs[g][t] += sum_k w[t,k] * scales[g, s] * (x[t] @ lora_a[g, s, :r].T) @ lora_b[g][s, :, :r].T
    with s = slots[t*K+k], r = ranks[g, s]

The torch twins run a step's LoRA as a few matmuls and scalings per projection group, in a
decode step every token through every slot in use (`_apply_dense`); here a group is one call
that walks each slot's own pairs in register-blocked tiles (up to four pairs by four ranks in
the shrink, up to eight pairs by two vectors of columns in the expand; a slot's last block holds
just its last pairs) and accumulates in fp32 (16-bit operands converted a vector at a time, 16-bit
outputs rounded once). Vectors are 16 fp32 lanes with AVX-512; elsewhere (AVX2) 8, with blocks
cut to fit 16 registers (two pairs by four ranks, six pairs by two vectors).
`benchmarks/lora_cpu.py` on an AVX-512 2-core CPU (4 layers' 16 group calls, 4 adapters,
rank 16, fp32; benchmarks/results/lora_cpu-cpu-2core.json): a 16-token decode step, caches
flushed before each call, 0.69 ms (one adapter per token) and 0.77 ms (top-2) against the twins'
3.5 and 3.6 ms at hidden 256 (0.24 ms top-2 on warm caches), and 1.8 and 2.3 ms against 6.9 and
7.0 ms at Qwen3-0.6B's layer shapes.
The kernel before 2026-11-26's register-blocked tiles took 0.83 and 1.00 ms at hidden 256 in the
same benchmark, and lost to the twins from 512 pairs up. `run_with_base` runs a group's base
matmul (its oneDNN-packed weight, or a dense one) and the kernel in one call, which the CPU
backend's `base_and_apply_shared` takes: the Python between the two was about 10 us a group call.

Built with the decoder's CPU ops into one extension by `kernels.cpu_ext` (on first use, for the
CPU it runs on); where it cannot be built, `available()` is False and the backend keeps to the
torch twins.
"""

from __future__ import annotations

import torch

from kernels import cpu_ext
from kernels.meta import DispatchMeta

# Which group calls the backend gives the kernel (`takes`), by dtype:
# - fp32: steps of at most MAX_PAIRS (token, k) pairs, prefill included; above, the twins' large
#   matmuls over each adapter's run of tokens catch up (benchmarks/lora_cpu.py, one adapter per
#   request: 1.14x and 0.93x the twins' speed at 1024 pairs, 1.03x and 0.82x at 2048, hidden 256
#   and Qwen3-0.6B shapes; top-2 per token, 1.24-1.36x at 2048).
# - bf16, on a CPU with bf16 dot products (AVX512-BF16 or AMX-BF16, `cpu_ext.native_dots`):
#   calls of at most MAX_MACS_BF16 multiply-adds (pairs x max rank x (G x D_in + sum of D_out)).
#   The kernel computes in fp32, while the twins' matmuls get oneDNN's bf16 dot products. Timed
#   per group call on an AVX-512 2-core CPU (hidden 256 and Qwen3-0.6B shapes, 256 to 2048 pairs),
#   the twins took 0.53-0.93x the kernel's time at 32M and more (one call, 1.04x), 0.87-2.71x at
#   20M and less (above 1x in all but three calls), either way in between.
# - bf16 elsewhere, and fp16: every call. Without those instructions torch's CPU bf16 and fp16
#   matmuls are slow: on an AVX2-only 2-core CPU the twins took 15-91x the kernel's time in bf16
#   (a 4-layer step, 16 to 2048 pairs); in fp16 on the AVX-512 CPU (no AVX512-FP16) 5.7-28x.
MAX_PAIRS = 1024
MAX_MACS_BF16 = 24 * 2**20


def available() -> bool:
    """True once the kernel is built (building it now if needed)."""
    return cpu_ext.available()


class Prepared:
    """A projection group's hot-set operands in the kernel's form, made once per layer: views of
    the buffers (which stay at their addresses and change in place), so they stay current."""

    def __init__(self, lora_a_group, lora_b_list, ranks_group, scales_group):
        self.dtype = lora_a_group.dtype
        self.args = (lora_a_group, [b.transpose(1, 2) for b in lora_b_list], ranks_group, scales_group)
        groups, _, max_rank, d_in = lora_a_group.shape
        self.macs_per_pair = max_rank * (groups * d_in + sum(b.shape[1] for b in lora_b_list))

    @staticmethod
    def make(lora_a_group, lora_b_list, ranks_group, scales_group) -> "Prepared | None":
        """The prepared operands, or None where the kernel does not take these buffers (then the
        caller runs the torch twins): no copy is made, so a buffer that would need one is refused."""
        tensors = [lora_a_group, *lora_b_list]
        fits = (
            lora_a_group.device.type == "cpu"
            and lora_a_group.dtype in cpu_ext.DTYPES
            and all(t.device.type == "cpu" and t.dtype == lora_a_group.dtype for t in tensors)
            and lora_a_group.is_contiguous()
            and all(b.transpose(1, 2).is_contiguous() for b in lora_b_list)
            and ranks_group.dtype == torch.int32 and ranks_group.is_contiguous()
            and scales_group.dtype == torch.float32 and scales_group.is_contiguous()
        )
        return Prepared(lora_a_group, lora_b_list, ranks_group, scales_group) if fits else None


def takes(prepared: Prepared, num_pairs: int) -> bool:
    """Whether the kernel, not the twins, runs a call of num_pairs (token, k) pairs on these
    operands: by dtype and CPU, where it measured faster (MAX_PAIRS, MAX_MACS_BF16)."""
    if prepared.dtype == torch.float16:
        return True
    if prepared.dtype == torch.bfloat16:
        return not cpu_ext.native_dots(torch.bfloat16) or num_pairs * prepared.macs_per_pair <= MAX_MACS_BF16
    return num_pairs <= MAX_PAIRS


def step_routes(meta: DispatchMeta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(slots int32[N], weights float32[N]) of the step for the kernel, made once per step and
    kept in meta; None where the weights need autograd (the torch twins run then)."""
    if "lora_cpu" not in meta.backend_cache:
        grad = torch.is_grad_enabled() and meta.weights.requires_grad
        meta.backend_cache["lora_cpu"] = None if grad else (
            meta.slots.to(torch.int32).contiguous(), meta.weights.float().contiguous())
    return meta.backend_cache["lora_cpu"]


def run_prepared(x: torch.Tensor, prepared: Prepared, routes, outs: list[torch.Tensor], top_k: int) -> None:
    """`lora_cpu_shared` on operands already checked (`Prepared.make`, `step_routes`); x must be
    contiguous and of the prepared dtype, outs of unit column stride (the kernel checks both)."""
    lora_a_group, lora_b_rank_major, ranks_group, scales_group = prepared.args
    cpu_ext.module().lora_shared(x, lora_a_group, lora_b_rank_major, outs, routes[0], routes[1], ranks_group,
                                 scales_group, top_k)


def run_with_base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int],
                  prepared: Prepared, routes, top_k: int) -> torch.Tensor:
    """x @ weight.T + bias plus `run_prepared`'s deltas into its column slices (`sizes` wide
    each), in one call: y [T, sum(sizes)]. weight: dense [sum(sizes), D_in], or reordered for
    oneDNN (`kernels.onednn.pack`), of x's dtype; bias [sum(sizes)] or None."""
    lora_a_group, lora_b_rank_major, ranks_group, scales_group = prepared.args
    return cpu_ext.module().linear_lora(x, weight, bias, sizes, lora_a_group, lora_b_rank_major, routes[0], routes[1],
                                        ranks_group, scales_group, top_k)


def lora_cpu_shared(
    x: torch.Tensor,
    lora_a_group: torch.Tensor,
    lora_b_list: list[torch.Tensor],
    ranks_group: torch.Tensor,
    scales_group: torch.Tensor,
    meta: DispatchMeta,
    outs: list[torch.Tensor],
) -> list[torch.Tensor]:
    """outs[g] += the per-token LoRA delta of module g; returns outs.

    Args:
        x: [T, D_in] fp32 / bf16 / fp16, contiguous.
        lora_a_group: [G, S, R, D_in], contiguous.
        lora_b_list: G tensors [S, D_out_g, R], views of [S, R, D_out_g] storage.
        ranks_group: int32[G, S]; scales_group: float32[G, S].
        meta: the step's dispatch metadata (slots int32[T*K], weights float32[T*K]).
        outs: G tensors [T, D_out_g] (column slices of one output are fine), updated in place.
    Raises ValueError for operands the kernel does not take (naming the problem) and
    RuntimeError where it could not be built.
    """
    prepared = Prepared.make(lora_a_group, lora_b_list, ranks_group, scales_group)
    if prepared is None:
        raise ValueError(f"lora_cpu_shared: lora_a and lora_b must be CPU tensors of one dtype in "
                         f"{list(cpu_ext.DTYPES)}, "
                         "lora_a contiguous, lora_b stored [S, R, D_out]; ranks int32 and scales float32, contiguous")
    if x.dtype != prepared.dtype or not x.is_contiguous():
        raise ValueError(f"lora_cpu_shared: x must be contiguous {prepared.dtype}; got {x.dtype}")
    routes = step_routes(meta)
    if routes is None:
        raise ValueError("lora_cpu_shared: the routing weights need autograd, which the kernel does not record")
    if cpu_ext.module() is None:
        raise RuntimeError("the CPU LoRA kernel is not built on this machine (see the log)")
    try:
        run_prepared(x, prepared, routes, outs, meta.top_k)
    except RuntimeError as exc:  # the kernel's own checks: shapes and layouts that disagree
        raise ValueError(f"lora_cpu_shared: {str(exc).splitlines()[0]}") from None
    return outs
