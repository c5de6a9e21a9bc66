"""LoRA expand (out[t] += w * scale * h @ lora_b.T per pair), prefill path: grouped tiles.

Same grouping as `kernels.lora_shrink`: each program multiplies a BLOCK_M-row tile of one
slot's segment of sorted pairs by a BLOCK_N-column tile of that slot's lora_b, looping over the
slot's own rank only (the zero padding up to R is never read). Grid (cdiv(N, BLOCK_M) *
cdiv(D_out, BLOCK_N), S), shapes only; programs past their slot's pair count exit at once.

Writing back: with K = 1 every token has exactly one pair, so exactly one program touches each
output row and a plain read-add-store is safe (deterministic, no atomics). With K > 1 a token's
pairs sit in different segments (or twice in one, if a plan repeats a slot), so programs race on
its row: they `atomic_add` fp32 values, straight into `out` when out is fp32, else into a
zeroed fp32 scratch [T, D_out] that is added to `out` once at the end (16-bit atomics are
missing on older GPUs and in the interpreter, and would round once per pair). The atomic order
varies, so K > 1 results can differ from run to run in the last fp32 bits.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_out features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_expand_decode import lora_expand_decode
from kernels.lora_launch import cdiv, check_expand_args, dot_in_fp32, next_pow2, pick_block_m
from kernels.meta import DispatchMeta


@triton.jit
def _lora_expand_kernel(
    h_ptr,  # float32[N, R]
    b_ptr,  # [S, D_out, R]
    out_ptr,  # [T, D_out]: out itself, or fp32 scratch when ATOMIC and out is 16-bit
    ranks_ptr,  # int32[S]
    scales_ptr,  # float32[S]
    weights_ptr,  # float32[N]
    sorted_pairs_ptr,  # int32[N]
    counts_ptr,  # int32[S]
    offsets_ptr,  # int32[S+1]
    D_OUT,
    R,
    stride_hp,
    stride_bs,
    stride_bn,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    num_n = tl.cdiv(D_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    count = tl.load(counts_ptr + slot)
    rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    if (pid_m * BLOCK_M >= count) | (rank <= 0):
        return

    start = tl.load(offsets_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    pairs = tl.load(sorted_pairs_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    tokens = pairs // TOP_K
    coef = tl.load(weights_ptr + pairs, mask=mask_m, other=0.0) * tl.load(scales_ptr + slot)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + pairs[:, None] * stride_hp + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        mask_k = offs_k < rank - k0
        ht = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Weighting h before the cast (as lora_expand_ref does) keeps one rounding to 16 bits.
        ht = (ht * coef[:, None]).to(b_ptr.dtype.element_ty)
        bt = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(ht.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(ht, bt)
        h_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    out_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask)


def lora_expand(
    h: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: DispatchMeta,
    out: torch.Tensor,
    block_m: int | None = None,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """Add every pair's weighted lora_b projection into its token's output row.

    Semantics: out[t] += sum_k weights[t*K+k] * scale[s] * h[t*K+k, :r] @ lora_b_stacked[s, :, :r].T
    with s = meta.slots[t*K+k], r = rank[s]; pairs with s == -1 add nothing (`lora_expand_ref`).
    Accumulates in fp32.

    Args:
        h: float32[N, R] contiguous, from lora_shrink.
        lora_b_stacked: [S, D_out, R] contiguous, same dtype as out.
        slot_ranks: int32[S] (ranks above R are clamped to R); slot_scales: float32[S].
        meta: dispatch metadata of the step.
        out: [T, D_out] fp32 / bf16 / fp16, rows contiguous; updated in place and returned.
        block_m: rows per tile of the grouped kernel (16, 32, 64 or 128); None takes meta.block_m,
            and if that is None too, picks it from the busiest slot's pair count (one host sync
            per step, cached in meta). A fixed value means no host sync, so the call can be
            captured in a CUDA graph.
        path: "auto" (decode kernel when `meta.is_decode`, else grouped), "decode" or "prefill".
    """
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"lora_expand: path must be 'auto', 'decode' or 'prefill'; got {path!r}")
    if path == "decode" or (path == "auto" and meta.is_decode):
        return lora_expand_decode(h, lora_b_stacked, slot_ranks, slot_scales, meta, out)
    check_expand_args("lora_expand", h, lora_b_stacked, slot_ranks, slot_scales, meta, out)
    _, d_out, rank = lora_b_stacked.shape
    if meta.num_pairs == 0 or rank == 0 or d_out == 0:
        return out
    atomic = meta.top_k > 1
    target = out
    if atomic and out.dtype != torch.float32:
        target = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    block_m = pick_block_m(meta, block_m if block_m is not None else meta.block_m)
    block_n = min(128, max(16, next_pow2(d_out)))
    block_k = min(64, max(16, next_pow2(rank)))
    grid = (cdiv(meta.num_pairs, block_m) * cdiv(d_out, block_n), meta.num_slots)
    _lora_expand_kernel[grid](
        h,
        lora_b_stacked,
        target,
        slot_ranks,
        slot_scales,
        meta.weights,
        meta.sorted_pairs,
        meta.slot_counts,
        meta.slot_offsets,
        d_out,
        rank,
        h.stride(0),
        lora_b_stacked.stride(0),
        lora_b_stacked.stride(1),
        target.stride(0),
        TOP_K=meta.top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ATOMIC=atomic,
        DOT_FP32=dot_in_fp32(out.dtype, out.device),
    )
    if target is not out:
        out.add_(target)
    return out
