"""The decoder's per-token ops on CPU (`kernels/csrc/decode_cpu.cpp`): launchers.

A decode step of a small model on CPU is bound by op count: RMSNorm is six torch ops, Qwen3's
q/k norm and RoPE about ten, the KV-cache write two index_put_ calls, and SDPA's flash kernel
tiles 32 or more queries where a decode row has one; and torch's CPU argmax, which the greedy
sampler runs over [B, V] logits, is 10-20x slower than a max. Each of these is one call here,
with the rounding of the torch path it replaces (`molora_core.model` keeps that path as the
fallback and for autograd). `enabled(x)` says whether a tensor may take them: a CPU tensor of fp32, bf16 or
fp16, grad mode off (they record no autograd), and the extension built (`kernels.cpu_ext`).
"""

from __future__ import annotations

import torch

from kernels import cpu_ext


def enabled(x: torch.Tensor) -> bool:
    """Whether x may take the compiled ops (see above)."""
    return (x.device.type == "cpu" and x.dtype in cpu_ext.DTYPES and not torch.is_grad_enabled()
            and cpu_ext.module() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * rms_normalize(s), s) with s = x + residual (x where residual is None; then the
    second value is None). x, residual [T, D] with unit column stride; weight [D] of x's dtype."""
    out, total = cpu_ext.module().rms_norm(x, residual, weight, eps)
    return out, (total if residual is not None else None)


def qk_norm_rope(qk: torch.Tensor, split: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Heads [:split] of qk [T, H, D_h] RMS-normalized with q_weight, the rest with k_weight (both
    None: no norm), then rotated by cos, sin [T, D_h] (`molora_core.model.rope.cos_sin`). A new
    contiguous [T, H, D_h]."""
    return cpu_ext.module().qk_norm_rope(qk, split, q_weight, k_weight, eps, cos, sin)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache[slots[t], :, positions[t]] = k[t], and v likewise. Caches [S, H_kv, N, D_h]
    contiguous; slots, positions int64[T]; k, v [T, H_kv, D_h] with unit last stride."""
    cpu_ext.module().kv_write(k_cache, v_cache, slots, positions, k, v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, rows: torch.Tensor, scale: float, window: int | None,
                     out: torch.Tensor) -> torch.Tensor:
    """out[rows[i]] = attention of q[i] [H, D_h] over the first lens[i] positions of KV slot
    slots[i] (the last `window` of them where window is set), grouped-query: query head h reads
    kv head h // (H / H_kv). slots, lens, rows int64[B]; out [R, H, D_h]. Returns out."""
    cpu_ext.module().decode_attention(q, k_cache, v_cache, slots, lens, rows, scale, window or 0, out)
    return out


def gate_route(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, top_k: int,
               lookup: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate router's routes, hidden [T, D] with unit column stride: per token, logits = weight @
    rms_normalize(h) + bias (weight float32 [A, D], bias float32 [A]), its top_k (ties to the lower
    adapter, NaN above every number as torch.topk), softmax-normalized, each adapter mapped to a
    hot-set slot by lookup int32[A]. Returns (slots int32[T, top_k], weights float32[T, top_k]):
    new tensors, or with `out` (int32 and float32 [T, >= top_k], unit column stride) the first
    top_k columns of out, written in place."""
    slots, weights = cpu_ext.module().gate_route(hidden, weight, bias, eps, top_k, lookup, out)
    return slots, weights


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """int64[B]: each row's argmax of logits [B, V], as torch.argmax(-1) (the first of ties; a
    row's first NaN where it has one); compiled, 10-20x faster, for CPU float32 rows (any grad
    mode: an index records no autograd), torch.argmax for the rest."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
        module = cpu_ext.module()
        if module is not None and logits.stride(1) == 1:
            return module.argmax_rows(logits)
    return logits.argmax(dim=-1)
