"""LoRA decode, shrink and expand in one launch for up to 3 modules that read the same x.

A decode step's LoRA work is tiny (a rank-16 product per pair), so on a GPU its cost is the
launches: shrink then expand per projection is 14 launches per decoder layer. Here one program
computes one BLOCK_N tile of one module's output for one token: for each of the token's K pairs
it recomputes h = x[t] @ lora_a[s, :r].T (R x D_in multiply-adds, the slot's lora_a read from L2)
and adds coef * lora_b[s, tile, :r] @ h into the tile. q/k/v is then one launch and gate/up one
(4 per layer), h never leaves registers, and out is read and written once. The grid,
(T, sum over modules of cdiv(D_out_g, BLOCK_N)), depends only on shapes: no host sync, so the
launch can be captured in a CUDA graph.

Legend: T tokens, K choices, G modules, S slots, R max rank, N = T * K pairs, D_in / D_out features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_launch import cdiv, check_group_args, launch_options, module_args, next_pow2
from kernels.meta import DispatchMeta

MAX_MODULES = 3
# The fused kernel recomputes each pair's h once per output tile, reading the slot's lora_a from L2
# each time. Measured on an H200 (benchmarks/lora_decode.py, 28 layers replayed as CUDA graphs,
# benchmarks/results/lora_decode-h200.json): for q/k/v and gate/up at Qwen3-0.6B shapes and q/k/v
# at 7B shapes (8 to 201 MB of such reads per step) it is 1.4-3.1x faster than separate shrink and
# expand launches; gate/up at 7B shapes (470 and 940 MB) is 0.5-0.7x, and a lone module (o, down)
# is 0.64-1.2x, slower at 16 tokens x top-2 in every shape measured; fp32 showed the same pattern
# (benchmarks/results/lora_decode-h200-fp32.json). So for fp32 inputs (16-bit ones take the
# slot-dense kernel) the backend fuses groups of 2 or 3 modules up to this many bytes of
# recomputed reads per step.
MAX_RECOMPUTE_BYTES = 256 << 20


def _blocks(rank: int, d_in: int, d_outs: list[int]) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_N): register tiles lora_a [BLOCK_R, BLOCK_K] and lora_b [BLOCK_N, BLOCK_R] in fp32."""
    block_r = max(16, next_pow2(rank))
    block_k = min(max(16, 2048 // block_r), max(16, next_pow2(d_in)))
    block_n = min(max(16, 4096 // block_r), max(16, next_pow2(max(d_outs))))
    return block_r, block_k, block_n


def recompute_bytes(num_pairs: int, lora_a_group: torch.Tensor, lora_b_list: list[torch.Tensor]) -> int:
    """lora_a bytes the fused kernel reads for one launch: every pair's slot rows, once per output tile."""
    _, _, rank, d_in = lora_a_group.shape
    _, _, block_n = _blocks(rank, d_in, [b.shape[1] for b in lora_b_list])
    tiles = sum(cdiv(b.shape[1], block_n) for b in lora_b_list)
    return num_pairs * tiles * rank * d_in * lora_a_group.element_size()


def use_fused(meta: DispatchMeta, lora_a_group: torch.Tensor, lora_b_list: list[torch.Tensor]) -> bool:
    """Whether a decode step's group of modules runs faster fused (see MAX_RECOMPUTE_BYTES)."""
    return (meta.is_decode and 2 <= len(lora_b_list) <= MAX_MODULES
            and recompute_bytes(meta.num_pairs, lora_a_group, lora_b_list) <= MAX_RECOMPUTE_BYTES)


@triton.jit
def _module_tile(
    x_ptr, a_ptr, b_ptr, out_ptr, ranks_ptr, scales_ptr, weights_ptr, slots_ptr, token, pid_n,
    D_IN, D_OUT, R, stride_xt, stride_as, stride_ar, stride_bs, stride_bn, stride_ot,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[token, tile] += sum_k coef_k * lora_b[s_k, tile, :r] @ (lora_a[s_k, :r] @ x[token])."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(TOP_K):
        pair = token * TOP_K + k
        slot = tl.load(slots_ptr + pair)
        safe_slot = tl.maximum(slot, 0).to(tl.int64)
        # Slot -1 and empty slots get rank 0: no iteration below, and the lora_b load is masked off.
        rank = tl.where(slot >= 0, tl.minimum(tl.load(ranks_ptr + safe_slot), R), 0)
        mask_r = offs_r < rank
        coef = tl.load(weights_ptr + pair) * tl.load(scales_ptr + safe_slot)
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        x_ptrs = x_ptr + token.to(tl.int64) * stride_xt + offs_k
        a_ptrs = a_ptr + safe_slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :]
        k_end = tl.where(rank > 0, D_IN, 0)
        for k0 in range(0, k_end, BLOCK_K):
            mask_k = offs_k < D_IN - k0
            xv = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            at = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            h += tl.sum(at * xv[None, :], axis=1)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
        b_ptrs = b_ptr + safe_slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :]
        bt = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bt * (h * coef)[None, :], axis=1)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_ot + offs_n
    current = tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _lora_fused_decode_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [G, S, R, D_in]
    ranks_ptr,  # int32[G, S]
    scales_ptr,  # float32[G, S]
    weights_ptr,  # float32[N]
    slots_ptr,  # int32[N]
    b0_ptr, out0_ptr, D_OUT0, stride_bs0, stride_bn0, stride_ot0,  # module 0: [S, D_out, R], [T, D_out]
    b1_ptr, out1_ptr, D_OUT1, stride_bs1, stride_bn1, stride_ot1,  # module 1 (G >= 2)
    b2_ptr, out2_ptr, D_OUT2, stride_bs2, stride_bn2, stride_ot2,  # module 2 (G == 3)
    D_IN, R, S, stride_xt, stride_ag, stride_as, stride_ar,
    G: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    tile = tl.program_id(1)
    tiles0 = tl.cdiv(D_OUT0, BLOCK_N)
    if tile < tiles0:
        _module_tile(x_ptr, a_ptr, b0_ptr, out0_ptr, ranks_ptr, scales_ptr, weights_ptr, slots_ptr, token, tile,
                     D_IN, D_OUT0, R, stride_xt, stride_as, stride_ar, stride_bs0, stride_bn0, stride_ot0,
                     TOP_K, BLOCK_N, BLOCK_R, BLOCK_K)
    else:
        if G > 1:
            tiles1 = tl.cdiv(D_OUT1, BLOCK_N)
            if tile < tiles0 + tiles1:
                _module_tile(x_ptr, a_ptr + stride_ag, b1_ptr, out1_ptr, ranks_ptr + S, scales_ptr + S, weights_ptr,
                             slots_ptr, token, tile - tiles0, D_IN, D_OUT1, R, stride_xt, stride_as, stride_ar,
                             stride_bs1, stride_bn1, stride_ot1, TOP_K, BLOCK_N, BLOCK_R, BLOCK_K)
            else:
                if G > 2:
                    _module_tile(x_ptr, a_ptr + 2 * stride_ag, b2_ptr, out2_ptr, ranks_ptr + 2 * S,
                                 scales_ptr + 2 * S, weights_ptr, slots_ptr, token, tile - tiles0 - tiles1,
                                 D_IN, D_OUT2, R, stride_xt, stride_as, stride_ar, stride_bs2, stride_bn2,
                                 stride_ot2, TOP_K, BLOCK_N, BLOCK_R, BLOCK_K)


def lora_fused_decode(
    x: torch.Tensor,
    lora_a_group: torch.Tensor,
    lora_b_list: list[torch.Tensor],
    ranks_group: torch.Tensor,
    scales_group: torch.Tensor,
    meta: DispatchMeta,
    outs: list[torch.Tensor],
    *,
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> list[torch.Tensor]:
    """outs[g] += per-token weighted LoRA delta of x for G <= 3 modules, in one launch.

    Semantics: outs[g][t] += sum_k w[t*K+k] * scales_group[g, s] * (x[t] @ lora_a_group[g, s, :r].T)
    @ lora_b_list[g][s, :, :r].T with s = meta.slots[t*K+k], r = ranks_group[g, s]; pairs with
    s == -1 add nothing (`lora_apply_shared_ref`).

    Args:
        x: [T, D_in] fp32 / bf16 / fp16, rows contiguous.
        lora_a_group: [G, S, R, D_in] contiguous, same dtype as x.
        lora_b_list: G tensors [S, D_out_g, R], contiguous, same dtype as the outs.
        ranks_group: int32[G, S]; scales_group: float32[G, S] (both contiguous).
        meta: dispatch metadata of the step; its slots must lie in [-1, S).
        outs: G tensors [T, D_out_g], rows contiguous (column slices of one output are fine);
            updated in place and returned.
        block_k, block_n, num_warps: tile sizes (powers of two, at least 16) and warps per
            program instead of the defaults (`benchmarks/lora_decode.py --sweep` times them).

    Each module's K contributions are summed in fp32 and its out is rounded once. Meant for
    decode steps (a few pairs per token): every output tile recomputes its pairs' h. No host sync.
    """
    check_group_args("lora_fused_decode", x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs,
                     MAX_MODULES)
    launch = launch_options("lora_fused_decode", block_k, block_n, num_warps)
    num_modules, rank = len(lora_b_list), lora_a_group.shape[2]
    if meta.num_tokens == 0 or rank == 0 or all(b.shape[1] == 0 for b in lora_b_list):
        return outs
    block_r, default_k, default_n = _blocks(rank, x.shape[1], [b.shape[1] for b in lora_b_list])
    block_k, block_n = block_k or default_k, block_n or default_n
    args = module_args(lora_b_list, outs, MAX_MODULES)
    tiles = sum(cdiv(b.shape[1], block_n) for b in lora_b_list)
    _lora_fused_decode_kernel[(meta.num_tokens, tiles)](
        x, lora_a_group, ranks_group, scales_group, meta.weights, meta.slots, *args,
        x.shape[1], rank, meta.num_slots, x.stride(0), lora_a_group.stride(0), lora_a_group.stride(1),
        lora_a_group.stride(2),
        G=num_modules, TOP_K=meta.top_k, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k, **launch,
    )
    return outs
