"""LoRA shrink (x -> h = x @ lora_a.T per pair), prefill path: grouped tiles over slot segments.

The (token, k) pairs of a step are sorted by slot (`kernels.meta.build_dispatch`), so every
slot's pairs form one contiguous segment of `meta.sorted_pairs`. Each program computes one
BLOCK_M x BLOCK_N tile of one slot's segment: it gathers BLOCK_M token rows of x and multiplies
them by the slot's lora_a, which is read once per tile instead of once per token (the grouped
GEMM of MoE kernels and vLLM's `lora_shrink`). The grid, (cdiv(N, BLOCK_M) * cdiv(R, BLOCK_N), S),
depends only on shapes; programs whose tile starts past their slot's pair count or rank exit
at once.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_in features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_launch import cdiv, check_shrink_args, dot_in_fp32, next_pow2, pick_block_m
from kernels.lora_shrink_decode import lora_shrink_decode
from kernels.meta import DispatchMeta


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [S, R, D_in]
    h_ptr,  # float32[N, R], zero-filled
    ranks_ptr,  # int32[S]
    sorted_pairs_ptr,  # int32[N]
    counts_ptr,  # int32[S]
    offsets_ptr,  # int32[S+1]
    D_IN,
    R,
    stride_xt,
    stride_as,
    stride_ar,
    stride_hp,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    num_n = tl.cdiv(R, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    count = tl.load(counts_ptr + slot)
    rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    # Rank tiles wholly inside the zero padding are skipped, not multiplied.
    if (pid_m * BLOCK_M >= count) | (pid_n * BLOCK_N >= rank):
        return

    start = tl.load(offsets_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    pairs = tl.load(sorted_pairs_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    tokens = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_n[None, :] * stride_ar + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        mask_k = offs_k < D_IN - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    h_ptrs = h_ptr + pairs[:, None] * stride_hp + offs_n[None, :]
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def lora_shrink(
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: DispatchMeta,
    block_m: int | None = None,
    *,
    path: str = "auto",
    zero_fill: bool = True,
) -> torch.Tensor:
    """Project every (token, k) pair onto its slot's lora_a.

    Semantics: h[t*K+k, :r] = x[t] @ lora_a_stacked[s, :r].T with s = meta.slots[t*K+k],
    r = rank[s]; h is zero past r and for s == -1 (same as `lora_shrink_ref`). Accumulates in fp32.

    Args:
        x: [T, D_in] fp32 / bf16 / fp16, rows contiguous.
        lora_a_stacked: [S, R, D_in] contiguous, same dtype as x.
        slot_ranks: int32[S] rank of each slot (0 = empty); ranks above R are clamped to R.
        meta: dispatch metadata of the step.
        block_m: rows per tile of the grouped kernel (16, 32, 64 or 128); None takes meta.block_m,
            and if that is None too, picks it from the busiest slot's pair count (one host sync
            per step, cached in meta). A fixed value means no host sync, so the call can be
            captured in a CUDA graph.
        path: "auto" (decode kernel when `meta.is_decode`, else grouped), "decode" or "prefill"
            to force one kernel (tests, benchmarks).
        zero_fill: False leaves the grouped kernel's h unwritten (not zero) in the rows of pairs
            on slot -1 and past each slot's rank, which `lora_expand` never reads: one launch
            fewer for a caller that hands h to it and nowhere else (`TritonBackend.apply`).
    Returns:
        h: float32[N, R].
    """
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"lora_shrink: path must be 'auto', 'decode' or 'prefill'; got {path!r}")
    if path == "decode" or (path == "auto" and meta.is_decode):
        return lora_shrink_decode(x, lora_a_stacked, slot_ranks, meta)
    check_shrink_args("lora_shrink", x, lora_a_stacked, slot_ranks, meta)
    num_pairs, rank = meta.num_pairs, lora_a_stacked.shape[1]
    # Pairs of slot -1 belong to no segment, and columns past a slot's rank are never
    # written: both stay zero (or unwritten, without zero_fill).
    h = (torch.zeros if zero_fill else torch.empty)(num_pairs, rank, dtype=torch.float32, device=x.device)
    if num_pairs == 0 or rank == 0:
        return h
    block_m = pick_block_m(meta, block_m if block_m is not None else meta.block_m)
    block_n = min(64, max(16, next_pow2(rank)))
    block_k = min(64, max(16, next_pow2(x.shape[1])))
    grid = (cdiv(num_pairs, block_m) * cdiv(rank, block_n), meta.num_slots)
    _lora_shrink_kernel[grid](
        x,
        lora_a_stacked,
        h,
        slot_ranks,
        meta.sorted_pairs,
        meta.slot_counts,
        meta.slot_offsets,
        x.shape[1],
        rank,
        x.stride(0),
        lora_a_stacked.stride(0),
        lora_a_stacked.stride(1),
        h.stride(0),
        TOP_K=meta.top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_FP32=dot_in_fp32(x.dtype, x.device),
    )
    return h
