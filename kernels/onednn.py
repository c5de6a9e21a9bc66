"""Linears with weights reordered once for oneDNN: the CPU matmul path.

MKL's sgemm repacks its weight operand on every call, which at decode sizes (a few to a few
dozen rows) costs more than the multiply. oneDNN with the weight reordered once does not: on
this project's 2-core CPU machine, the 17 projections of the quick engine benchmark's model take
2.5 ms per 16-token decode step through `F.linear` and 1.2 ms packed (prefill, 512 rows: 30 and
21 ms). CPU inference stacks do the same (vLLM's CPU backend, IPEX); this goes through PyTorch's
own oneDNN ops, the ones Inductor uses for frozen CPU linears, and is skipped where a build lacks
them. (The hot-set's LoRA weights are not packed: with rank-16 shapes, packed shrink and expand
measured slower inside the model than MKL's, 302 against 250 us per q/k/v group at hidden 1024.)
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when this torch build runs packed oneDNN linears (checked once, on a tiny probe)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 16), torch.randn(3, 16)
        y = linear(x, torch.ops.mkldnn._reorder_linear_weight(w))
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(y, x @ w.T, atol=1e-4))


def can_pack(weight: torch.Tensor) -> bool:
    """A 2-D CPU fp32/bf16 weight [N, K], on a build with oneDNN linears."""
    return weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2 and available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] reordered for `linear` (an opaque oneDNN tensor)."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} {list(weight.shape)} weight on {weight.device} for oneDNN")
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias -> [..., N] for W packed by `pack` (x rows may be strided)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
