"""A decode step's base projections and their LoRA in one launch: y = x @ W.T + b + the LoRA delta.

On an H200 a decode step of 16 tokens spent 0.64 ms in the base projections of a Qwen3-0.6B
stack (112 matmuls, about 6 us each) and 0.81 ms more in their LoRA (the slot-dense kernel,
split-K: two launches per group; benchmarks/results/lora_decode-h200-split-k-default.json).
Neither is bound by bytes: the weights of a layer read in a few microseconds. What they wait on
is the chain of dependent steps in each launch, and there are three launches per group.

Here one program computes one BLOCK_N tile of one module's output for every token of the step,
base and LoRA together: each step of its K loop loads the x tile once and multiplies it by the
base weight's tile and by the lora_a columns of the first chunk of slots (`kernels.lora_dense`'s
chunks), so the shrink of that chunk rides on the base matmul's loop; its lora_a reads are the
same for every output tile and come from L2. Further chunks (more slots in range than one chunk
holds) each run their own shrink loop, as the one-launch form of `lora_dense` does. The tile
then adds the chunks' weighted deltas (`_chunk_delta`) and the bias and is stored once: the
output is written, never read, so no base result goes through memory in between and no zeroed
buffer is needed.

Every output tile re-reads the first chunk's lora_a, so narrow tiles over a wide D_in (Qwen3-0.6B
down: 16-wide tiles over 3072) read more lora_a than weight. `split_k` > 1 moves the shrink to
`lora_dense`'s split-K launch first (lora_a read once, fp32 partial products), and the base loop
reads only x and the weight: two launches a group instead of one. The default is the one-launch
form: on an H200 (bf16, Qwen3-0.6B shapes, 16 tokens x top-2) split-K over 2 to 8 ranges took
1.1-1.4x its time in every group (`benchmarks/lora_decode.py --sweep`).

Decode steps only (at most MAX_TOKENS tokens, one tile of rows); the grid, (sum over modules of
cdiv(D_out_g, BLOCK_N),), depends only on shapes and nothing is read on the host, so the launch
is captured in a CUDA graph. On an H200 (bf16, Qwen3-0.6B shapes, 28 layers, 16 tokens, gate-like
top-2) the one-launch form took 1.09 ms a step against 1.51 for the base matmuls (0.64) then the
slot-dense LoRA (0.84, split-K): benchmarks/results/lora_decode-h200-dense-base.json. The
backend's "auto" takes it for 16-bit decode steps; 7B shapes are not yet timed.

Legend: T tokens, K choices, G modules, S slots, R max rank, D_in / D_out features.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.lora_dense import (
    MAX_MODULES, MAX_TOKENS, _blocks, _chunk_columns, _chunk_delta, _chunk_partials, _chunk_shrink, split_shrink,
)
from kernels.lora_launch import cdiv, check_group_args, check_int32_extents, dot_in_fp32, launch_options, module_args
from kernels.meta import DispatchMeta

# Depth of the K loop's software pipeline where it fits the device's shared memory (else
# Triton's default, 3). On an H200 (bf16, Qwen3-0.6B shapes, 16 tokens x top-2, 28 layers
# replayed as a CUDA graph; benchmarks/results/lora_decode-h200-sweep-dense-base.json) 4 stages
# took 0.200 / 0.182 / 0.247 / 0.344 ms for q/k/v, o, gate/up and down against 0.215 / 0.210 /
# 0.250 / 0.435 with 3: the best of 19 settings for o, gate/up and down, within 2% of the best
# (256-wide K steps) for q/k/v.
PIPELINE_STAGES = 4
# Shared memory left for what the loop's tiles do not take (the expand's lora_b tiles, layout
# conversions).
SHARED_MEMORY_SPARE = 16 * 1024


def pipeline_stages(stage_bytes: int, shared_memory: int) -> int | None:
    """PIPELINE_STAGES where that many stages of `stage_bytes` each (one K step's x, weight and
    lora_a tiles) fit `shared_memory` bytes with SHARED_MEMORY_SPARE to spare, else None
    (Triton's default: an L4's 100 KB, or fp32 tiles on an H100, get what worked before)."""
    return PIPELINE_STAGES if PIPELINE_STAGES * stage_bytes + SHARED_MEMORY_SPARE <= shared_memory else None


def _shared_memory(device: torch.device) -> int:
    """Shared memory one program may opt in to on `device`, in bytes; 0 off CUDA or where the
    device does not say (`scripts/kernel_resources.py` stands in a compile target's)."""
    return _cuda_shared_memory(device.index) if device.type == "cuda" else 0


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(device_index: int) -> int:
    return getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0)


def default_block_n(d_outs: list[int]) -> int:
    """Output tiles narrow enough that a group has at least 64 programs where it can (16 wide at
    least, for the dots): one program streams its tile's whole base weight rows, so a 1024-wide
    projection in 64-wide tiles would keep 16 SMs busy. On an H200 (bf16, Qwen3-0.6B shapes, 16
    tokens x top-2) within 3% of the best of 16 to 128 wide tiles, 4 or 8 warps, in each group."""
    for block_n in (64, 32):
        if sum(cdiv(d, block_n) for d in d_outs) >= 64:
            return block_n
    return 16


@triton.jit
def _base_module_tile(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ranks_ptr, scales_ptr, weights_ptr, slots_ptr, counts_ptr, h_ptr,
    g, pid_n, T, D_IN, D_OUT, R, S_LO, S_HI, stride_xt, stride_wn, stride_as, stride_ar, stride_bs, stride_bn,
    stride_ot, G: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out[:, tile] = x @ w[tile].T + bias[tile] + sum over used slots s in [S_LO, S_HI) of
    (coef[:, s] * scale[s] * (x @ lora_a[s, :r].T)) @ lora_b[s, tile, :r].T; h computed here
    (SPLITS == 0: the first chunk's inside the base loop) or summed from the SPLITS partial
    products `kernels.lora_dense.split_shrink` wrote."""
    BLOCK_SR: tl.constexpr = SLOTS_PER_CHUNK * BLOCK_R
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    offs_k = tl.arange(0, BLOCK_K)
    # The first chunk's shrink shares the base loop's x tiles (its dead columns load nothing).
    slot_j, r_j, live_j, a_cols = _chunk_columns(ranks_ptr, counts_ptr, S_LO, R, S_HI, stride_as, stride_ar,
                                                 BLOCK_R, SLOTS_PER_CHUNK)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_T, BLOCK_SR), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_j = k0 + offs_k
        mask_k = k_j < D_IN
        xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + k_j[None, :],
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + k_j[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, wt)
        if SPLITS == 0:
            at = tl.load(a_ptr + a_cols[None, :] + k_j[:, None],
                         mask=mask_k[:, None] & live_j[None, :], other=0.0)  # [BLOCK_K, BLOCK_SR]
            if DOT_FP32:
                h += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:
                h += tl.dot(xt, at)
    if SPLITS == 0:
        acc += _chunk_delta(h, slot_j, r_j, live_j, offs_t, mask_t, offs_n, mask_n, b_ptr, scales_ptr, weights_ptr,
                            slots_ptr, stride_bs, stride_bn, TOP_K, BLOCK_T, BLOCK_SR, DOT_FP32)
        rest = S_LO + SLOTS_PER_CHUNK
    else:
        rest = S_LO  # every chunk from its partials (written only where a column is live)
    num_chunks = tl.cdiv(S_HI - S_LO, SLOTS_PER_CHUNK)
    for s0 in range(rest, S_HI, SLOTS_PER_CHUNK):
        slot_j, r_j, live_j, a_cols = _chunk_columns(ranks_ptr, counts_ptr, s0, R, S_HI, stride_as, stride_ar,
                                                     BLOCK_R, SLOTS_PER_CHUNK)
        if tl.max(live_j.to(tl.int32), axis=0) > 0:
            if SPLITS == 0:
                h = _chunk_shrink(x_ptr, a_ptr, a_cols, live_j, T, 0, 0, D_IN, D_IN, stride_xt, BLOCK_T, BLOCK_SR,
                                  BLOCK_K, DOT_FP32)
            else:
                h = _chunk_partials(h_ptr, g, (s0 - S_LO) // SLOTS_PER_CHUNK, num_chunks, 0, 1, G, SPLITS, BLOCK_T,
                                    BLOCK_SR)
            acc += _chunk_delta(h, slot_j, r_j, live_j, offs_t, mask_t, offs_n, mask_n, b_ptr, scales_ptr,
                                weights_ptr, slots_ptr, stride_bs, stride_bn, TOP_K, BLOCK_T, BLOCK_SR, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_n[None, :])


@triton.jit
def _lora_dense_base_kernel(
    x_ptr,  # [T, D_in]
    a_ptr,  # [G, S, R, D_in]
    ranks_ptr,  # int32[G, S]
    scales_ptr,  # float32[G, S]
    weights_ptr,  # float32[N]
    slots_ptr,  # int32[N]
    counts_ptr,  # int32[S]
    h_ptr,  # float32 partial products of split_shrink (SPLITS > 0; unread otherwise)
    w0_ptr, bias0_ptr, stride_wn0,  # module 0: base weight [D_out, D_in] (rows of stride_wn0), bias [D_out]
    b0_ptr, out0_ptr, D_OUT0, stride_bs0, stride_bn0, stride_ot0,  # module 0: lora_b [S, D_out, R], out [T, D_out]
    w1_ptr, bias1_ptr, stride_wn1,
    b1_ptr, out1_ptr, D_OUT1, stride_bs1, stride_bn1, stride_ot1,  # module 1 (G >= 2)
    w2_ptr, bias2_ptr, stride_wn2,
    b2_ptr, out2_ptr, D_OUT2, stride_bs2, stride_bn2, stride_ot2,  # module 2 (G == 3)
    T, D_IN, R, S, S_LO, S_HI, stride_xt, stride_ag, stride_as, stride_ar,
    G: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SLOTS_PER_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Program = output tile; tiles run over module 0's columns, then 1's, 2's."""
    tile = tl.program_id(0)
    tiles0 = tl.cdiv(D_OUT0, BLOCK_N)
    if tile < tiles0:
        _base_module_tile(x_ptr, w0_ptr, bias0_ptr, a_ptr, b0_ptr, out0_ptr, ranks_ptr, scales_ptr, weights_ptr,
                          slots_ptr, counts_ptr, h_ptr, 0, tile, T, D_IN, D_OUT0, R, S_LO, S_HI, stride_xt, stride_wn0,
                          stride_as, stride_ar, stride_bs0, stride_bn0, stride_ot0, G, TOP_K, BLOCK_T, BLOCK_N,
                          BLOCK_R, SLOTS_PER_CHUNK, BLOCK_K, SPLITS, HAS_BIAS, DOT_FP32)
    else:
        if G > 1:
            tiles1 = tl.cdiv(D_OUT1, BLOCK_N)
            if tile < tiles0 + tiles1:
                _base_module_tile(x_ptr, w1_ptr, bias1_ptr, a_ptr + stride_ag, b1_ptr, out1_ptr, ranks_ptr + S,
                                  scales_ptr + S, weights_ptr, slots_ptr, counts_ptr, h_ptr, 1, tile - tiles0, T, D_IN,
                                  D_OUT1, R, S_LO, S_HI, stride_xt, stride_wn1, stride_as, stride_ar, stride_bs1,
                                  stride_bn1, stride_ot1, G, TOP_K, BLOCK_T, BLOCK_N, BLOCK_R, SLOTS_PER_CHUNK,
                                  BLOCK_K, SPLITS, HAS_BIAS, DOT_FP32)
            else:
                if G > 2:
                    _base_module_tile(x_ptr, w2_ptr, bias2_ptr, a_ptr + 2 * stride_ag, b2_ptr, out2_ptr,
                                      ranks_ptr + 2 * S, scales_ptr + 2 * S, weights_ptr, slots_ptr, counts_ptr, h_ptr,
                                      2, tile - tiles0 - tiles1, T, D_IN, D_OUT2, R, S_LO, S_HI, stride_xt,
                                      stride_wn2, stride_as, stride_ar, stride_bs2, stride_bn2, stride_ot2, G, TOP_K,
                                      BLOCK_T, BLOCK_N, BLOCK_R, SLOTS_PER_CHUNK, BLOCK_K, SPLITS, HAS_BIAS, DOT_FP32)


def _check_base(op: str, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None,
                outs: list[torch.Tensor]) -> None:
    """G weights [D_out_g, D_in] with contiguous rows and G biases [D_out_g] (or None), of x's
    dtype and device."""
    if len(weights) != len(outs) or (biases is not None and len(biases) != len(outs)):
        raise ValueError(f"{op}: one weight (and bias, if any) per module; got {len(weights)} weights, "
                         f"{'no' if biases is None else len(biases)} biases and {len(outs)} outs")
    for g, (w, out) in enumerate(zip(weights, outs)):
        if tuple(w.shape) != (out.shape[1], x.shape[1]) or w.stride(1) != 1:
            raise ValueError(f"{op}: weight {g} must be [D_out={out.shape[1]}, D_in={x.shape[1]}] with contiguous "
                             f"rows; got {list(w.shape)} strides {w.stride()}")
        tensors = [("weight", w)] + ([] if biases is None else [("bias", biases[g])])
        if biases is not None and (tuple(biases[g].shape) != (out.shape[1],) or not biases[g].is_contiguous()):
            raise ValueError(f"{op}: bias {g} must be contiguous [D_out={out.shape[1]}]; got {list(biases[g].shape)}")
        for name, t in tensors:
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{op}: {name} {g} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")


def lora_dense_base(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
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
    split_k: int = 1,
) -> list[torch.Tensor]:
    """outs[g] = x @ weights[g].T + biases[g] + the per-token weighted LoRA delta of x, for G <= 3
    modules reading x, in one launch; a decode step (at most MAX_TOKENS tokens).

    The delta is `lora_dense`'s: sum_k w[t*K+k] * scales_group[g, s] * (x[t] @
    lora_a_group[g, s, :r].T) @ lora_b_list[g][s, :, :r].T with s = meta.slots[t*K+k], r =
    ranks_group[g, s]; pairs with s == -1 add nothing.

    Args:
        x: [T, D_in], fp32 / bf16 / fp16, rows contiguous.
        weights: G base weights [D_out_g, D_in] (rows contiguous: views of one concatenated
            weight are fine), x's dtype; biases: G tensors [D_out_g] or None.
        lora_a_group, lora_b_list, ranks_group, scales_group, meta: as `lora_dense`.
        outs: G tensors [T, D_out_g] (column slices of one output are fine), written (their
            contents are never read); returned.
        block_k, block_n, num_warps, num_stages: tile sizes and launch options; None takes the
            defaults (num_stages: PIPELINE_STAGES on CUDA where they fit, `pipeline_stages`).
        split_k: 1 (the default) shrinks inside the one launch: the first slot chunk's in the
            base loop, every output tile re-reading its lora_a from L2. k > 1 first runs
            `lora_dense`'s split-K shrink over k ranges of D_in (fp32 partial products, lora_a read
            once), then this kernel, which sums them: two launches a group instead of one, and the
            base loop reads only x and the weight. Which wins where is not yet measured.

    Base and LoRA products accumulate in fp32, h is rounded to the weights' dtype after
    weighting (as `lora_dense` does) and each out is rounded once, so for 16-bit inputs the base
    part is not rounded before the delta is added, as it is when the two run apart.
    """
    op = "lora_dense_base"
    check_group_args(op, x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, MAX_MODULES)
    _check_base(op, x, weights, biases, outs)
    launch = launch_options(op, block_k, block_n, num_warps, num_stages)
    if not 1 <= split_k <= 64:
        raise ValueError(f"{op}: split_k must be 1 to 64; got {split_k}")
    rows = meta.num_tokens
    if rows > MAX_TOKENS:
        raise ValueError(f"{op}: decode steps only (at most {MAX_TOKENS} tokens); got {rows}")
    check_int32_extents(op, [("lora_a_group", lora_a_group.numel()),
                             *((f"weight {g}", w.shape[0] * w.stride(0)) for g, w in enumerate(weights)),
                             *((f"lora_b {g}", b.numel()) for g, b in enumerate(lora_b_list))])
    d_outs = [b.shape[1] for b in lora_b_list]
    if rows == 0 or sum(d_outs) == 0:
        return outs
    rank, d_in = lora_a_group.shape[2], x.shape[1]
    block_t, block_r, slots_per_chunk, default_k = _blocks(rows, rank, meta.num_slots, d_in, d_outs)
    block_k, block_n = block_k or default_k, block_n or default_block_n(d_outs)
    launch.setdefault("num_warps", 4)
    if "num_stages" not in launch:
        stage_bytes = (block_t + block_n + slots_per_chunk * block_r) * block_k * x.element_size()
        stages = pipeline_stages(stage_bytes, _shared_memory(x.device))
        if stages is not None:
            launch["num_stages"] = stages
    splits, partials = 0, x  # x stands in for the unread partials pointer of a one-launch call
    if split_k > 1:
        # The shrink launch with lora_dense's default warps (its tiles are lora_dense's).
        splits, partials = split_shrink(x, lora_a_group, ranks_group, meta, (0, meta.num_slots), split_k,
                                        (block_t, block_r, slots_per_chunk, block_k), {"num_warps": 8})
    # Per module: base weight, bias (the weight stands in for an unread one), row stride, then the
    # LoRA arguments; slots past the group repeat the last module (never read).
    lora_args, args = module_args(lora_b_list, outs, MAX_MODULES), []
    for g in range(MAX_MODULES):
        m = min(g, len(weights) - 1)
        w = weights[m]
        args += [w, w if biases is None else biases[m], w.stride(0), *lora_args[6 * g: 6 * g + 6]]
    tiles = sum(cdiv(d, block_n) for d in d_outs)
    _lora_dense_base_kernel[(tiles,)](
        x, lora_a_group, ranks_group, scales_group, meta.weights, meta.slots, meta.slot_counts, partials, *args,
        rows, d_in, rank, meta.num_slots, 0, meta.num_slots, x.stride(0), lora_a_group.stride(0),
        lora_a_group.stride(1), lora_a_group.stride(2),
        G=len(lora_b_list), TOP_K=meta.top_k, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
        SLOTS_PER_CHUNK=slots_per_chunk, BLOCK_K=block_k, SPLITS=splits, HAS_BIAS=biases is not None,
        DOT_FP32=dot_in_fp32(x.dtype, x.device), **launch,
    )
    return outs
