"""LoRA over every used slot at once, with tensor-core dots, for up to 3 modules sharing x.

The fused decode kernel (`kernels.lora_fused_decode`) runs one program per token and output
tile, and recomputes each pair's h in a serial loop of vector products over D_in, the likely
bound of its times on an H200 (a lone down projection, 3072 wide, took 23 us a layer where its
lora weights read in well under one; inferred, not profiled). Here one program computes one
BLOCK_N tile of one module's output for every token of the step: it multiplies the step's
x [T, D_in] by the lora_a of a chunk of slots at once ([D_in, chunk slots x R], one `tl.dot`
per BLOCK_K, so the loop is short and software-pipelined), weights each (token, slot) column
block by the token's summed pair weight on that slot (zero where the token is not routed there)
and multiplies the result by the chunk's lora_b with a second `tl.dot`. Slots no pair uses
(`meta.slot_counts`) are masked off, so their weights are not read, and a chunk without any is
skipped.

Decode steps (up to MAX_TOKENS tokens) are one tile of rows. Longer (prefill) steps are cut into
tiles of PREFILL_BLOCK_T tokens, a second grid dimension, and always run the shrink as its own
launch (h once per token tile, instead of once per output tile); the caller may also name the
range of slots in use (`slot_range`), which bounds the chunks and the fp32 h buffer. There every
token's pairs are summed in one program's registers and written with one plain store, so a
token with two choices needs no zeroed fp32 scratch and no atomics, unlike the grouped prefill
kernels (`kernels.lora_shrink`, `kernels.lora_expand`), and a group of modules takes two launches
instead of two per module.

The price is work: every token goes through every used slot of a chunk (span / K times the
LoRA FLOPs of routing each pair alone), which tensor cores absorb at decode sizes but which
grows with the number of slots in use. In the one-launch form each output tile recomputes h (its
lora_a reads come from L2). The grid, (sum over modules of cdiv(D_out_g, BLOCK_N), token tiles),
depends only on shapes and the kernel reads counts and routes on the device: no host sync, so a
decode step can be captured in a CUDA graph.

Legend: T tokens, K choices, G modules, S slots, R max rank, N = T * K pairs, D_in / D_out features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_launch import (
    cdiv, check_group_args, check_int32_extents, dot_in_fp32, launch_options, module_args, next_pow2,
)
from kernels.meta import DispatchMeta

MAX_MODULES = 3
# Steps of up to this many tokens are one tile of rows (decode steps).
MAX_TOKENS = 64
# Rows per token tile of longer steps.
PREFILL_BLOCK_T = 64
# Columns of h (slots x rank) multiplied per dot; slots are taken in chunks of this many columns.
CHUNK_COLUMNS = 64


def _blocks(num_tokens: int, rank: int, num_slots: int, d_in: int, d_outs: list[int]) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, SLOTS_PER_CHUNK, BLOCK_K) for a step's shapes (num_slots: those in range)."""
    block_t = max(16, next_pow2(num_tokens)) if num_tokens <= MAX_TOKENS else PREFILL_BLOCK_T
    block_r = max(16, next_pow2(rank))
    slots_per_chunk = max(1, min(CHUNK_COLUMNS // block_r, next_pow2(num_slots)))
    # The K loop is the kernel's serial chain (every program runs all of it): wide steps keep it
    # short (3072 wide: 24 steps of 128).
    block_k = min(128, max(16, next_pow2(d_in)))
    return block_t, block_r, slots_per_chunk, block_k


def default_split_k(d_in: int) -> int:
    """Ranges of D_in the shrink is split over by default (1: one launch). On an H200 (bf16, 16
    tokens x top-2, 28 layers replayed as CUDA graphs; benchmarks/results/lora_decode-h200-sweep.json)
    the best split against one launch: D_in 1024 (Qwen3-0.6B q/k/v, o, gate/up): 4, 1.1-1.2x;
    3072 (its down): 4 or 8, 1.7x; 4096 (7B q/k/v, o, gate/up): 8-16, 2.1-3.5x; 14336 (7B down):
    16, 4.7x. About 512 columns per range, 4 to 16 ranges; below 1024 (not timed) one launch."""
    if d_in < 1024:
        return 1
    return min(16, max(4, next_pow2(d_in // 512)))


def default_block_n(d_outs: list[int], token_tiles: int = 1) -> int:
    """Narrow tiles (more programs) for small outputs, wide ones where narrow tiles would
    recompute h hundreds of times. Steps of several token tiles (prefill) have programs to spare:
    128 wide there, so each token tile's h and routes are read a few times per module, not a few
    dozen (not timed)."""
    widest = max(d_outs)
    tiles_64 = sum(cdiv(d, 64) for d in d_outs)
    block_n = 64 if tiles_64 <= 256 and token_tiles == 1 else 128
    return min(block_n, max(16, next_pow2(widest)))


@triton.jit
def _chunk_columns(ranks_ptr, counts_ptr, s0, R, S_HI, stride_as, stride_ar,
                   BLOCK_R: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr):
    """A chunk's columns j (slot s0 + j // BLOCK_R, rank row j % BLOCK_R): (slot, live, lora_a
    row offset). Columns of slots past S_HI or unused and past a slot's rank are not live, and
    never loaded (padding may hold anything)."""
    offs_j = tl.arange(0, SLOTS_PER_CHUNK * BLOCK_R)
    slot_j = s0 + offs_j // BLOCK_R
    r_j = offs_j % BLOCK_R
    in_range = slot_j < S_HI
    count_j = tl.load(counts_ptr + slot_j, mask=in_range, other=0)
    rank_j = tl.minimum(tl.load(ranks_ptr + slot_j, mask=in_range, other=0), R)
    live_j = (count_j > 0) & (r_j < rank_j)
    # int32 offsets from scalar bases (the launcher checks they fit): 64-bit pointer tensors of
    # these tiles would take most of the registers.
    return slot_j, r_j, live_j, slot_j * stride_as + r_j * stride_ar


@triton.jit
def _token_tile(pid, T, BLOCK_T: tl.constexpr, TILED: tl.constexpr):
    """(pid // token tiles, token tile, token tiles) of a program id whose fastest index is the
    token tile. A step of one tile (TILED false: decode) compiles with constants here."""
    if TILED:
        t_tiles = tl.cdiv(T, BLOCK_T)
        return pid // t_tiles, pid % t_tiles, t_tiles
    else:
        return pid, 0, 1


@triton.jit
def _chunk_shrink(x_ptr, a_ptr, a_cols, live_j, T, t0, k_start, k_end, D_IN, stride_xt,
                  BLOCK_T: tl.constexpr, BLOCK_SR: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """h [BLOCK_T, BLOCK_SR] fp32 = x[t0:t0 + BLOCK_T, k_start:k_end] @ (the chunk's lora_a
    columns)[k_start:k_end]."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_k = tl.arange(0, BLOCK_K)
    h = tl.zeros((BLOCK_T, BLOCK_SR), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_j = k0 + offs_k
        mask_k = k_j < D_IN
        xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + k_j[None, :],
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
        at = tl.load(a_ptr + a_cols[None, :] + k_j[:, None],
                     mask=mask_k[:, None] & live_j[None, :], other=0.0)  # [BLOCK_K, BLOCK_SR]
        if DOT_FP32:
            h += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            h += tl.dot(xt, at)
    return h


@triton.jit
def _chunk_partials(h_ptr, g, chunk, num_chunks, pid_t, t_tiles, G: tl.constexpr, SPLITS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_SR: tl.constexpr):
    """h [BLOCK_T, BLOCK_SR] fp32 of module g's slot chunk `chunk` in token tile pid_t: the sum of
    the SPLITS partial products `_lora_dense_shrink_kernel` wrote, in a fixed order."""
    rows = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_SR)
    h = tl.zeros((BLOCK_T, BLOCK_SR), dtype=tl.float32)
    for c in tl.static_range(SPLITS):
        part = h_ptr + (((c * G + g) * num_chunks + chunk) * t_tiles + pid_t) * (BLOCK_T * BLOCK_SR)
        h += tl.load(part + rows[:, None] * BLOCK_SR + offs_j[None, :])
    return h


@triton.jit
def _chunk_delta(h, slot_j, r_j, live_j, offs_t, mask_t, offs_n, mask_n, b_ptr, scales_ptr, weights_ptr, slots_ptr,
                 stride_bs, stride_bn, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SR: tl.constexpr,
                 DOT_FP32: tl.constexpr):
    """[BLOCK_T, BLOCK_N] fp32: (coef * scale * h) @ the chunk's lora_b rows of the output tile
    offs_n, for h [BLOCK_T, BLOCK_SR] = x @ the chunk's lora_a columns (`_chunk_columns`)."""
    # coef[t, j]: token t's summed pair weight on column j's slot (0 if not routed there).
    coef = tl.zeros((BLOCK_T, BLOCK_SR), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair_slot = tl.load(slots_ptr + offs_t * TOP_K + k, mask=mask_t, other=-1)
        pair_weight = tl.load(weights_ptr + offs_t * TOP_K + k, mask=mask_t, other=0.0)
        coef += tl.where(pair_slot[:, None] == slot_j[None, :], pair_weight[:, None], 0.0)
    scale_j = tl.load(scales_ptr + slot_j, mask=live_j, other=0.0)
    h = h * coef * scale_j[None, :]
    bt = tl.load(b_ptr + (slot_j * stride_bs + r_j)[:, None] + offs_n[None, :] * stride_bn,
                 mask=live_j[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_SR, BLOCK_N]
    if DOT_FP32:
        # h rounded to the weights' dtype first, as the tensor-core path below does.
        delta = tl.dot(h.to(bt.dtype).to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(h.to(bt.dtype), bt)
    return delta


@triton.jit
def _dense_module_tile(
    x_ptr, a_ptr, b_ptr, out_ptr, ranks_ptr, scales_ptr, weights_ptr, slots_ptr, counts_ptr, h_ptr, g, pid_n,
    pid_t, t_tiles, T, D_IN, D_OUT, R, S_LO, S_HI, stride_xt, stride_as, stride_ar, stride_bs, stride_bn, stride_ot,
    G: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SLOTS_PER_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out[token tile, tile] += sum over used slots s in [S_LO, S_HI) of
    (coef[:, s] * scale[s] * (x @ lora_a[s, :r].T)) @ lora_b[s, tile, :r].T; h computed here
    (SPLITS == 0) or summed from the SPLITS partial products `_lora_dense_shrink_kernel` wrote."""
    BLOCK_SR: tl.constexpr = SLOTS_PER_CHUNK * BLOCK_R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    num_chunks = tl.cdiv(S_HI - S_LO, SLOTS_PER_CHUNK)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for s0 in range(S_LO, S_HI, SLOTS_PER_CHUNK):
        slot_j, r_j, live_j, a_cols = _chunk_columns(ranks_ptr, counts_ptr, s0, R, S_HI, stride_as, stride_ar,
                                                     BLOCK_R, SLOTS_PER_CHUNK)
        if tl.max(live_j.to(tl.int32), axis=0) > 0:
            if SPLITS == 0:
                h = _chunk_shrink(x_ptr, a_ptr, a_cols, live_j, T, pid_t * BLOCK_T, 0, D_IN, D_IN, stride_xt,
                                  BLOCK_T, BLOCK_SR, BLOCK_K, DOT_FP32)
            else:
                h = _chunk_partials(h_ptr, g, (s0 - S_LO) // SLOTS_PER_CHUNK, num_chunks, pid_t, t_tiles, G, SPLITS,
                                    BLOCK_T, BLOCK_SR)
            acc += _chunk_delta(h, slot_j, r_j, live_j, offs_t, mask_t, offs_n, mask_n, b_ptr, scales_ptr,
                                weights_ptr, slots_ptr, stride_bs, stride_bn, TOP_K, BLOCK_T, BLOCK_SR, DOT_FP32)
    out_ptrs = out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :]
    mask_out = mask_t[:, None] & mask_n[None, :]
    current = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lora_dense_shrink_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [G, S, R, D_in]
    ranks_ptr,  # int32[G, S]
    counts_ptr,  # int32[S]
    h_ptr,  # float32[SPLITS, G, chunks, token tiles, BLOCK_T, SLOTS_PER_CHUNK * BLOCK_R]
    T, D_IN, R, S, S_LO, S_HI, K_PER_SPLIT, stride_xt, stride_ag, stride_as, stride_ar,
    G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, TILED: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Split-K shrink: program (c * token tiles + t, g, chunk) writes x[t-th token tile, c-th K
    range] @ module g's lora_a of the chunk's slots. A chunk with no live column writes nothing
    (the expand skips it too)."""
    c, pid_t, t_tiles = _token_tile(tl.program_id(0), T, BLOCK_T, TILED)
    g, chunk = tl.program_id(1), tl.program_id(2)
    BLOCK_SR: tl.constexpr = SLOTS_PER_CHUNK * BLOCK_R
    slot_j, r_j, live_j, a_cols = _chunk_columns(ranks_ptr + g * S, counts_ptr, S_LO + chunk * SLOTS_PER_CHUNK, R,
                                                 S_HI, stride_as, stride_ar, BLOCK_R, SLOTS_PER_CHUNK)
    if tl.max(live_j.to(tl.int32), axis=0) > 0:
        k_start = c * K_PER_SPLIT
        h = _chunk_shrink(x_ptr, a_ptr + g * stride_ag, a_cols, live_j, T, pid_t * BLOCK_T, k_start,
                          tl.minimum(k_start + K_PER_SPLIT, D_IN), D_IN, stride_xt, BLOCK_T, BLOCK_SR, BLOCK_K,
                          DOT_FP32)
        num_chunks = tl.cdiv(S_HI - S_LO, SLOTS_PER_CHUNK)
        part = h_ptr + (((c * G + g) * num_chunks + chunk) * t_tiles + pid_t) * (BLOCK_T * BLOCK_SR)
        rows = tl.arange(0, BLOCK_T)
        offs_j = tl.arange(0, BLOCK_SR)
        tl.store(part + rows[:, None] * BLOCK_SR + offs_j[None, :], h)


@triton.jit
def _lora_dense_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [G, S, R, D_in]
    ranks_ptr,  # int32[G, S]
    scales_ptr,  # float32[G, S]
    weights_ptr,  # float32[N]
    slots_ptr,  # int32[N]
    counts_ptr,  # int32[S]
    h_ptr,  # float32 partial products of _lora_dense_shrink_kernel (SPLITS > 0; unread otherwise)
    b0_ptr, out0_ptr, D_OUT0, stride_bs0, stride_bn0, stride_ot0,  # module 0: [S, D_out, R], [T, D_out]
    b1_ptr, out1_ptr, D_OUT1, stride_bs1, stride_bn1, stride_ot1,  # module 1 (G >= 2)
    b2_ptr, out2_ptr, D_OUT2, stride_bs2, stride_bn2, stride_ot2,  # module 2 (G == 3)
    T, D_IN, R, S, S_LO, S_HI, stride_xt, stride_ag, stride_as, stride_ar,
    G: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SLOTS_PER_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, TILED: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Program (output tile, token tile); output tiles run over module 0's columns, then 1's, 2's."""
    tile = tl.program_id(0)
    _, pid_t, t_tiles = _token_tile(tl.program_id(1), T, BLOCK_T, TILED)
    tiles0 = tl.cdiv(D_OUT0, BLOCK_N)
    if tile < tiles0:
        _dense_module_tile(x_ptr, a_ptr, b0_ptr, out0_ptr, ranks_ptr, scales_ptr, weights_ptr, slots_ptr, counts_ptr,
                           h_ptr, 0, tile, pid_t, t_tiles, T, D_IN, D_OUT0, R, S_LO, S_HI, stride_xt, stride_as,
                           stride_ar, stride_bs0, stride_bn0, stride_ot0, G, TOP_K, BLOCK_T, BLOCK_N, BLOCK_R,
                           SLOTS_PER_CHUNK, BLOCK_K, SPLITS, DOT_FP32)
    else:
        if G > 1:
            tiles1 = tl.cdiv(D_OUT1, BLOCK_N)
            if tile < tiles0 + tiles1:
                _dense_module_tile(x_ptr, a_ptr + stride_ag, b1_ptr, out1_ptr, ranks_ptr + S, scales_ptr + S,
                                   weights_ptr, slots_ptr, counts_ptr, h_ptr, 1, tile - tiles0, pid_t, t_tiles, T,
                                   D_IN, D_OUT1, R, S_LO, S_HI, stride_xt, stride_as, stride_ar, stride_bs1,
                                   stride_bn1, stride_ot1, G, TOP_K, BLOCK_T, BLOCK_N, BLOCK_R, SLOTS_PER_CHUNK,
                                   BLOCK_K, SPLITS, DOT_FP32)
            else:
                if G > 2:
                    _dense_module_tile(x_ptr, a_ptr + 2 * stride_ag, b2_ptr, out2_ptr, ranks_ptr + 2 * S,
                                       scales_ptr + 2 * S, weights_ptr, slots_ptr, counts_ptr, h_ptr, 2,
                                       tile - tiles0 - tiles1, pid_t, t_tiles, T, D_IN, D_OUT2, R, S_LO, S_HI,
                                       stride_xt, stride_as, stride_ar, stride_bs2, stride_bn2, stride_ot2, G, TOP_K,
                                       BLOCK_T, BLOCK_N, BLOCK_R, SLOTS_PER_CHUNK, BLOCK_K, SPLITS, DOT_FP32)


def lora_dense(
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
    num_stages: int | None = None,
    split_k: int | None = None,
    slot_range: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """outs[g] += per-token weighted LoRA delta of x for G <= 3 modules, every token through
    every used slot: one launch for a decode step (two with `split_k`), two for a longer step.

    Semantics (as `lora_fused_decode` and `lora_apply_shared_ref`): outs[g][t] += sum_k
    w[t*K+k] * scales_group[g, s] * (x[t] @ lora_a_group[g, s, :r].T) @ lora_b_list[g][s, :, :r].T
    with s = meta.slots[t*K+k], r = ranks_group[g, s]; pairs with s == -1 add nothing.

    Args:
        x: [T, D_in], fp32 / bf16 / fp16, rows contiguous.
        lora_a_group: [G, S, R, D_in] contiguous, same dtype as x.
        lora_b_list: G tensors [S, D_out_g, R], contiguous, same dtype as the outs.
        ranks_group: int32[G, S]; scales_group: float32[G, S] (both contiguous).
        meta: dispatch metadata of the step (slots, weights and slot_counts are read on the
            device); its slots must lie in [-1, S).
        outs: G tensors [T, D_out_g], rows contiguous (column slices of one output are fine);
            updated in place and returned.
        block_k, block_n: tile sizes (powers of two, at least 16); num_warps, num_stages: launch
            options; None takes the defaults (`benchmarks/lora_decode.py --sweep` times others).
        split_k: for steps of up to MAX_TOKENS tokens, 1 computes h inside every output tile (one
            launch; each tile re-reads the slots' lora_a from L2) and k > 1 first runs a shrink
            launch over k ranges of D_in ([k, G, slot chunks] programs writing fp32 partial
            products), then the expand, which sums the k partials: lora_a is read once, at the
            price of a second launch. Longer steps always take the shrink launch (k ranges x token
            tiles programs; k = 1 where None). The sum order is fixed, so results do not vary from
            run to run. None: `default_split_k` for decode steps.
        slot_range: (lo, hi): every pair's slot lies in [lo, hi) or is -1, as the caller knows
            from the host (`meta.host_counts()`); chunks start at lo and stop at hi. None: all S
            slots (no host read, as a CUDA graph needs).

    h is accumulated in fp32 and, for 16-bit inputs, rounded to the input dtype after weighting
    (as the torch reference rounds it); each module's out is rounded once.
    """
    op = "lora_dense"
    check_group_args(op, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, MAX_MODULES)
    launch = launch_options(op, block_k, block_n, num_warps, num_stages)
    if split_k is not None and not 1 <= split_k <= 64:
        raise ValueError(f"{op}: split_k must be 1 to 64; got {split_k}")
    lo, hi = (0, meta.num_slots) if slot_range is None else slot_range
    if not 0 <= lo <= hi <= meta.num_slots:
        raise ValueError(f"{op}: slot_range must satisfy 0 <= lo <= hi <= S={meta.num_slots}; got {slot_range}")
    # The kernels index every tensor with int32 offsets.
    rows = meta.num_tokens
    check_int32_extents(op, [("lora_a_group", lora_a_group.numel()),
                             *((f"lora_b {g}", b.numel()) for g, b in enumerate(lora_b_list)),
                             ("x", rows * x.stride(0)),
                             *((f"out {g}", rows * o.stride(0)) for g, o in enumerate(outs))])
    num_modules, rank = len(lora_b_list), lora_a_group.shape[2]
    if rows == 0 or rank == 0 or hi == lo or all(b.shape[1] == 0 for b in lora_b_list):
        return outs
    d_outs = [b.shape[1] for b in lora_b_list]
    block_t, block_r, slots_per_chunk, default_k = _blocks(rows, rank, hi - lo, x.shape[1], d_outs)
    token_tiles = cdiv(rows, block_t)
    block_k, block_n = block_k or default_k, block_n or default_block_n(d_outs, token_tiles)
    # 8 warps by default: compiled for sm_90 (scripts/kernel_resources.py), 4 warps spill registers
    # at Qwen3-0.6B q/k/v (Triton 3.6) and at 64 tokens x rank 64 (3.9); 8 spill nowhere measured.
    launch.setdefault("num_warps", 8)
    d_in, dot_fp32 = x.shape[1], dot_in_fp32(x.dtype, x.device)
    strides = (x.stride(0), lora_a_group.stride(0), lora_a_group.stride(1), lora_a_group.stride(2))
    splits, partials = 0, x  # x stands in for the unread partials pointer of a one-launch call
    if split_k is None:
        split_k = default_split_k(d_in) if token_tiles == 1 else 1
    if split_k > 1 or token_tiles > 1:
        splits, partials = split_shrink(x, lora_a_group, ranks_group, meta, (lo, hi), split_k,
                                        (block_t, block_r, slots_per_chunk, block_k), launch)
    args = module_args(lora_b_list, outs, MAX_MODULES)
    tiles = sum(cdiv(d, block_n) for d in d_outs)
    _lora_dense_kernel[(tiles, token_tiles)](
        x, lora_a_group, ranks_group, scales_group, meta.weights, meta.slots, meta.slot_counts, partials, *args,
        rows, d_in, rank, meta.num_slots, lo, hi, *strides,
        G=num_modules, TOP_K=meta.top_k, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
        SLOTS_PER_CHUNK=slots_per_chunk, BLOCK_K=block_k, SPLITS=splits, TILED=token_tiles > 1, DOT_FP32=dot_fp32,
        **launch,
    )
    return outs


def split_shrink(x: torch.Tensor, lora_a_group: torch.Tensor, ranks_group: torch.Tensor, meta: DispatchMeta,
                 slot_range: tuple[int, int], split_k: int, blocks: tuple[int, int, int, int],
                 launch: dict) -> tuple[int, torch.Tensor]:
    """Launch `_lora_dense_shrink_kernel` over `split_k` ranges of D_in (cut at BLOCK_K
    boundaries), every token tile, module and slot chunk of `slot_range`; blocks = (BLOCK_T,
    BLOCK_R, SLOTS_PER_CHUNK, BLOCK_K). Returns (ranges, their fp32 partial products) for a kernel
    that sums them (`_chunk_partials`)."""
    block_t, block_r, slots_per_chunk, block_k = blocks
    (lo, hi), (rows, d_in), num_modules = slot_range, x.shape, lora_a_group.shape[0]
    token_tiles = cdiv(rows, block_t)
    k_per_split = cdiv(cdiv(d_in, split_k), block_k) * block_k
    splits = cdiv(d_in, k_per_split)
    chunks = cdiv(hi - lo, slots_per_chunk)
    partials = torch.empty(splits, num_modules, chunks, token_tiles, block_t, slots_per_chunk * block_r,
                           dtype=torch.float32, device=x.device)
    _lora_dense_shrink_kernel[(splits * token_tiles, num_modules, chunks)](
        x, lora_a_group, ranks_group, meta.slot_counts, partials, rows, d_in, lora_a_group.shape[2], meta.num_slots,
        lo, hi, k_per_split, x.stride(0), lora_a_group.stride(0), lora_a_group.stride(1), lora_a_group.stride(2),
        G=num_modules, BLOCK_T=block_t, BLOCK_R=block_r, SLOTS_PER_CHUNK=slots_per_chunk, BLOCK_K=block_k,
        TILED=token_tiles > 1, DOT_FP32=dot_in_fp32(x.dtype, x.device), **launch,
    )
    return splits, partials
