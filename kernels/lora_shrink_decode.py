"""LoRA shrink, decode path: one program per (token, k) pair, gathering the pair's slot.

With a handful of pairs per step (decode), grouping them by slot buys nothing: each pair reads
its own slot's lora_a rows (a gathered matrix-vector product, like Punica's BGMV). The grid
depends only on shapes, so the launch is CUDA-graph safe.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_in features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_launch import cdiv, check_shrink_args, next_pow2
from kernels.meta import DispatchMeta


@triton.jit
def _lora_shrink_decode_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [S, R, D_in]
    h_ptr,  # float32[N, R]
    ranks_ptr,  # int32[S]
    slots_ptr,  # int32[N]
    D_IN,
    R,
    stride_xt,
    stride_as,
    stride_ar,
    stride_hp,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = pair // TOP_K
    slot = tl.load(slots_ptr + pair)
    safe_slot = tl.maximum(slot, 0).to(tl.int64)
    rank = tl.where(slot >= 0, tl.minimum(tl.load(ranks_ptr + safe_slot), R), 0)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64) * stride_xt + offs_k
    a_ptrs = a_ptr + safe_slot * stride_as + offs_n[:, None] * stride_ar + offs_k[None, :]

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Slot -1, rank 0 and rank blocks wholly in the padding run no iteration and store zeros.
    k_end = tl.where(pid_n * BLOCK_N < rank, D_IN, 0)
    for k0 in range(0, k_end, BLOCK_K):
        mask_k = offs_k < D_IN - k0
        xv = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
        at = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(at * xv[None, :], axis=1)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    tl.store(h_ptr + pair.to(tl.int64) * stride_hp + offs_n, acc, mask=offs_n < R)


def lora_shrink_decode(
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: DispatchMeta,
) -> torch.Tensor:
    """Project every (token, k) pair onto its slot's lora_a, one program per pair.

    Semantics: h[t*K+k, :r] = x[t] @ lora_a_stacked[s, :r].T with s = meta.slots[t*K+k],
    r = rank[s]; h is zero past r and for s == -1 (same as `lora_shrink_ref`).

    Args:
        x: [T, D_in] fp32 / bf16 / fp16, rows contiguous.
        lora_a_stacked: [S, R, D_in] contiguous, same dtype as x.
        slot_ranks: int32[S] rank of each slot (0 = empty); ranks above R are clamped to R.
        meta: dispatch metadata of the step; its slots must lie in [-1, S).
    Returns:
        h: float32[N, R] (every entry written, so no zero-fill is needed).

    No host sync: safe to capture in a CUDA graph.
    """
    check_shrink_args("lora_shrink_decode", x, lora_a_stacked, slot_ranks, meta)
    num_pairs, rank = meta.num_pairs, lora_a_stacked.shape[1]
    h = torch.empty(num_pairs, rank, dtype=torch.float32, device=x.device)
    if num_pairs == 0 or rank == 0:
        return h.zero_()
    block_n = min(64, next_pow2(rank))
    block_k = min(128, max(16, next_pow2(x.shape[1])))
    grid = (num_pairs, cdiv(rank, block_n))
    _lora_shrink_decode_kernel[grid](
        x,
        lora_a_stacked,
        h,
        slot_ranks,
        meta.slots,
        x.shape[1],
        rank,
        x.stride(0),
        lora_a_stacked.stride(0),
        lora_a_stacked.stride(1),
        h.stride(0),
        TOP_K=meta.top_k,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return h
