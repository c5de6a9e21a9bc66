"""LoRA expand, decode path: one program per (token, D_out block), looping over the K choices.

Each program owns its token's output rows, so the top-K contributions are summed in fp32
registers and written once: no atomics, deterministic, and no fp32 scratch buffer. The grid
depends only on shapes, so the launch is CUDA-graph safe.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_out features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_launch import cdiv, check_expand_args, next_pow2
from kernels.meta import DispatchMeta


@triton.jit
def _lora_expand_decode_kernel(
    h_ptr,  # float32[N, R]
    b_ptr,  # [S, D_out, R]
    out_ptr,  # [T, D_out]
    ranks_ptr,  # int32[S]
    scales_ptr,  # float32[S]
    weights_ptr,  # float32[N]
    slots_ptr,  # int32[N]
    D_OUT,
    R,
    stride_hp,
    stride_bs,
    stride_bn,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(TOP_K):
        pair = token * TOP_K + k
        slot = tl.load(slots_ptr + pair)
        safe_slot = tl.maximum(slot, 0).to(tl.int64)
        # Slot -1 and empty slots get rank 0: the loop below runs no iteration.
        rank = tl.where(slot >= 0, tl.minimum(tl.load(ranks_ptr + safe_slot), R), 0)
        coef = tl.load(weights_ptr + pair) * tl.load(scales_ptr + safe_slot)
        h_ptrs = h_ptr + pair.to(tl.int64) * stride_hp + offs_r
        b_ptrs = b_ptr + safe_slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :]
        for r0 in range(0, rank, BLOCK_R):
            mask_r = offs_r < rank - r0
            hv = tl.load(h_ptrs, mask=mask_r, other=0.0)
            bt = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(bt * (hv * coef)[None, :], axis=1)
            h_ptrs += BLOCK_R
            b_ptrs += BLOCK_R
    out_ptrs = out_ptr + token.to(tl.int64) * stride_ot + offs_n
    current = tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask_n)


def lora_expand_decode(
    h: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: DispatchMeta,
    out: torch.Tensor,
) -> torch.Tensor:
    """Add every pair's weighted lora_b projection into its token's row, one program per token.

    Semantics: out[t] += sum_k weights[t*K+k] * scale[s] * h[t*K+k, :r] @ lora_b_stacked[s, :, :r].T
    with s = meta.slots[t*K+k], r = rank[s]; pairs with s == -1 add nothing (`lora_expand_ref`).

    Args:
        h: float32[N, R] contiguous, from lora_shrink.
        lora_b_stacked: [S, D_out, R] contiguous, same dtype as out.
        slot_ranks: int32[S]; slot_scales: float32[S].
        meta: dispatch metadata of the step; its slots must lie in [-1, S).
        out: [T, D_out] fp32 / bf16 / fp16, rows contiguous; updated in place and returned.

    The K contributions of a token are summed in fp32 and out is rounded once. No host sync.
    """
    check_expand_args("lora_expand_decode", h, lora_b_stacked, slot_ranks, slot_scales, meta, out)
    _, d_out, rank = lora_b_stacked.shape
    if meta.num_tokens == 0 or rank == 0 or d_out == 0:
        return out
    block_n = min(128, max(16, next_pow2(d_out)))
    block_r = min(64, max(16, next_pow2(rank)))
    grid = (meta.num_tokens, cdiv(d_out, block_n))
    _lora_expand_decode_kernel[grid](
        h,
        lora_b_stacked,
        out,
        slot_ranks,
        slot_scales,
        meta.weights,
        meta.slots,
        d_out,
        rank,
        h.stride(0),
        lora_b_stacked.stride(0),
        lora_b_stacked.stride(1),
        out.stride(0),
        TOP_K=meta.top_k,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
    return out
