"""RMSNorm and the SwiGLU MLP, with Hugging Face's parameter names and rounding order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import decode_cpu


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalized in fp32 and cast back before the
    weight multiply, as transformers does (this order matters for bf16 parity). F.rms_norm
    normalizes 16-bit inputs in fp32 and rounds its output to their dtype, so without a weight it
    is that first step in one op; with one, CUDA's fused kernel would multiply before rounding."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_norm(x)[0] if x.dim() == 2 else self._torch(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) with s = x + residual, rounded to the dtype (s = x where residual is None):
        a decoder layer's residual add and the norm after it. x, residual [T, D]. On CPU one
        compiled call (`kernels.decode_cpu`) where it applies."""
        if self.weight.dtype == x.dtype and x.stride(-1) == 1 and decode_cpu.enabled(x):
            if residual is None or (residual.dtype == x.dtype and residual.stride(-1) == 1):
                out, total = decode_cpu.rms_norm(x, self.weight, self.eps, residual)
                return out, x if total is None else total
        total = x if residual is None else x + residual
        return self._torch(total), total

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


def rms_norm_heads(x: torch.Tensor, split: int, first: RMSNorm, second: RMSNorm) -> torch.Tensor:
    """`first` over heads [:split] of x [T, H, D_h] and `second` over the rest, normalizing once:
    Qwen3's q_norm and k_norm over q's and k's heads side by side. The same rounding as the two
    norms run apart (which it falls back to where their eps or dtypes differ). Torch ops only:
    the decoder's CPU path fuses this with RoPE (`molora_core.model.attention`)."""
    if first.eps != second.eps or not x.dtype == first.weight.dtype == second.weight.dtype:
        return torch.cat((first(x[:, :split]), second(x[:, split:])), dim=1)
    h = F.rms_norm(x, first.weight.shape, None, first.eps)  # fp32 inside, rounded to x's dtype
    h[:, :split].mul_(first.weight)  # in place on views (`h[i] *= w` would add a copy back)
    h[:, split:].mul_(second.weight)
    return h


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)). Plain nn.Linear projections, so a LoRA-aware
    layer can replace each one by name; x is [T, D] flattened tokens."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        # Set by molora_core.lora_layer.attach_molora: runs gate/up with one matmul and one LoRA call.
        self.gate_up_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_group is not None:
            gate, up = self.gate_up_group(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
