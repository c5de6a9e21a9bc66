"""Linears with weights reordered once for oneDNN: the CPU matmul path.

MKL's sgemm repacks its weight operand on every call, which at decode sizes (a few to a few
dozen rows) costs more than the multiply. oneDNN with the weight reordered once does not: on
an AVX-512 2-core CPU (AMD EPYC), the 17 projections of the quick engine benchmark's model take
2.5 ms per 16-token decode step through `F.linear` and 1.2 ms packed (prefill, 512 rows: 30 and
21 ms). CPU inference stacks do the same (vLLM's CPU backend, IPEX); this goes through PyTorch's
own oneDNN ops, the ones Inductor uses for frozen CPU linears, and is skipped where a build (or,
for bf16, the CPU) lacks them. (The hot-set's LoRA weights are not packed: with rank-16 shapes,
packed shrink and expand measured slower inside the model than MKL's, 302 against 250 us per
q/k/v group at hidden 1024.)
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build, on this CPU, runs packed oneDNN linears in `dtype` (checked
    once per dtype, on a tiny probe). bf16 needs more than the build: PyTorch refuses to pack bf16
    weights on a CPU without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, an AVX2-only host among them."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 16).to(dtype), torch.randn(3, 16).to(dtype)
        y = linear(x, torch.ops.mkldnn._reorder_linear_weight(w))
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(y.float(), (x @ w.T).float(), atol=1e-4 if dtype == torch.float32 else 5e-2))


def can_pack(weight: torch.Tensor) -> bool:
    """A 2-D CPU fp32/bf16 weight [N, K], where this build and CPU run oneDNN linears in its dtype."""
    return weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2 and available(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] reordered for `linear` (an opaque oneDNN tensor)."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} {list(weight.shape)} weight on {weight.device} for oneDNN")
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias -> [..., N] for W packed by `pack` (x rows may be strided)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
