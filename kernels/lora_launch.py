"""Argument checks and block-size choices shared by the LoRA shrink / expand launchers.

No kernels here (one Triton kernel per file); only host-side code that never reads tensor
contents, so a launcher that uses it with a fixed `block_m` does no device sync and can be
captured in a CUDA graph.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_in / D_out features.
"""

from __future__ import annotations

import torch

from kernels.meta import DispatchMeta

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M_CHOICES = (16, 32, 64, 128)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (grids, tile counts). `triton.cdiv` does the same as a
    constexpr function and costs about 2 us per call from the host (triton 3.9, this project's CPU
    machine); a launcher takes a dozen."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pick_block_m(meta: DispatchMeta, block_m: int | None) -> int:
    """Rows per tile of the grouped (prefill) kernels.

    Like MoE kernels, size the tile to the tokens per expert: a slot with 10 pairs wastes most
    of a 64-row tile, a slot with 2,000 pairs wants big tiles for weight reuse. The busiest
    slot decides (one host sync per step, cached in `meta`). A given `block_m` is used as is,
    with no sync, so the launch can be captured in a CUDA graph.
    """
    if block_m is not None:
        if block_m not in BLOCK_M_CHOICES:
            raise ValueError(f"block_m must be one of {BLOCK_M_CHOICES}; got {block_m}")
        return block_m
    busiest = meta.max_pairs_per_slot()
    if busiest <= 16:
        return 16
    if busiest <= 64:
        return 32
    if busiest <= 512:
        return 64
    return 128


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tiles are upcast to fp32 (IEEE, no TF32) before `tl.dot`.

    fp32 inputs: always, so fp32 results match the fp32 reference instead of TF32's ~1e-3.
    bf16 on CPU (the Triton interpreter): the interpreter's bf16 `tl.dot` returns garbage
    (triton 3.9), and the fp32 dot of bf16 values is exactly what a bf16 tensor-core dot with
    fp32 accumulation computes, so the interpreter still tests the GPU numerics.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu")


def _check_slot_vectors(op: str, meta: DispatchMeta, slot_ranks: torch.Tensor, device: torch.device) -> None:
    if slot_ranks.dtype != torch.int32 or slot_ranks.shape != (meta.num_slots,):
        raise ValueError(
            f"{op}: slot_ranks must be int32[S={meta.num_slots}]; "
            f"got {slot_ranks.dtype}{list(slot_ranks.shape)}"
        )
    vectors = {
        "slot_ranks": slot_ranks,
        "meta.slots": meta.slots,
        "meta.sorted_pairs": meta.sorted_pairs,
        "meta.slot_counts": meta.slot_counts,
        "meta.slot_offsets": meta.slot_offsets,
    }
    for name, t in vectors.items():
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def check_shrink_args(
    op: str, x: torch.Tensor, lora_a_stacked: torch.Tensor, slot_ranks: torch.Tensor, meta: DispatchMeta
) -> None:
    """x [T, D_in] rows contiguous; lora_a_stacked [S, R, D_in] contiguous, same dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: x dtype {x.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if lora_a_stacked.dtype != x.dtype:
        raise ValueError(f"{op}: lora_a_stacked dtype {lora_a_stacked.dtype} != x dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] != meta.num_tokens:
        raise ValueError(f"{op}: x must be [T={meta.num_tokens}, D_in]; got {list(x.shape)}")
    a_shape = tuple(lora_a_stacked.shape)
    if len(a_shape) != 3 or a_shape[0] != meta.num_slots or a_shape[2] != x.shape[1]:
        raise ValueError(
            f"{op}: lora_a_stacked must be [S={meta.num_slots}, R, D_in={x.shape[1]}]; "
            f"got {list(lora_a_stacked.shape)}"
        )
    if x.stride(1) != 1:
        raise ValueError(f"{op}: x rows must be contiguous (stride(1) == 1); got strides {x.stride()}")
    if not lora_a_stacked.is_contiguous():
        raise ValueError(f"{op}: lora_a_stacked must be contiguous")
    if lora_a_stacked.device != x.device:
        raise ValueError(f"{op}: lora_a_stacked is on {lora_a_stacked.device}, x on {x.device}")
    _check_slot_vectors(op, meta, slot_ranks, x.device)


def check_expand_args(
    op: str,
    h: torch.Tensor | None,
    lora_b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: DispatchMeta,
    out: torch.Tensor,
) -> None:
    """h float32[N, R] contiguous (None: computed inside the kernel); lora_b_stacked [S, D_out, R]
    contiguous; out [T, D_out] same dtype."""
    _check_expand_module(op, lora_b_stacked, meta, out)
    rank = lora_b_stacked.shape[2]
    h_ok = h is None or (h.dtype == torch.float32 and tuple(h.shape) == (meta.num_pairs, rank) and h.is_contiguous())
    if not h_ok:
        raise ValueError(
            f"{op}: h must be contiguous float32[N={meta.num_pairs}, R={rank}]; got {h.dtype}{list(h.shape)}"
        )
    scales_ok = slot_scales.dtype == torch.float32 and slot_scales.shape == (meta.num_slots,)
    if not scales_ok or not slot_scales.is_contiguous():
        raise ValueError(
            f"{op}: slot_scales must be contiguous float32[S={meta.num_slots}]; "
            f"got {slot_scales.dtype}{list(slot_scales.shape)}"
        )
    others = {"h": h, "slot_scales": slot_scales, "meta.weights": meta.weights}
    for name, t in others.items():
        if t is None:
            continue
        if t.device != out.device:
            raise ValueError(f"{op}: {name} is on {t.device}, out on {out.device}")
    if meta.weights.dtype != torch.float32 or not meta.weights.is_contiguous():
        raise ValueError(f"{op}: meta.weights must be contiguous float32[N]; got {meta.weights.dtype}")
    _check_slot_vectors(op, meta, slot_ranks, out.device)


def _check_expand_module(op: str, lora_b_stacked: torch.Tensor, meta: DispatchMeta, out: torch.Tensor) -> None:
    """One module's lora_b_stacked [S, D_out, R] contiguous and out [T, D_out] of its dtype, rows
    contiguous, on one device."""
    if out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: out dtype {out.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if lora_b_stacked.dtype != out.dtype:
        raise ValueError(f"{op}: lora_b_stacked dtype {lora_b_stacked.dtype} != out dtype {out.dtype}")
    if lora_b_stacked.dim() != 3 or lora_b_stacked.shape[0] != meta.num_slots:
        raise ValueError(
            f"{op}: lora_b_stacked must be [S={meta.num_slots}, D_out, R]; got {list(lora_b_stacked.shape)}"
        )
    d_out = lora_b_stacked.shape[1]
    if tuple(out.shape) != (meta.num_tokens, d_out):
        raise ValueError(f"{op}: out must be [T={meta.num_tokens}, D_out={d_out}]; got {list(out.shape)}")
    if out.stride(1) != 1:
        raise ValueError(f"{op}: out rows must be contiguous (stride(1) == 1); got strides {out.stride()}")
    if not lora_b_stacked.is_contiguous():
        raise ValueError(f"{op}: lora_b_stacked must be contiguous")
    if lora_b_stacked.device != out.device:
        raise ValueError(f"{op}: lora_b_stacked is on {lora_b_stacked.device}, out on {out.device}")


def check_group_args(
    op: str,
    x: torch.Tensor,
    lora_a_group: torch.Tensor,
    lora_b_list: list[torch.Tensor],
    ranks_group: torch.Tensor,
    scales_group: torch.Tensor,
    meta: DispatchMeta,
    outs: list[torch.Tensor],
    max_modules: int,
) -> None:
    """Arguments of a one-launch kernel over G <= max_modules modules reading the same x:
    lora_a_group [G, S, R, D_in] contiguous, G lora_b [S, D_out_g, R] and G outs [T, D_out_g]
    (each as `check_shrink_args` / `check_expand_args` want), ranks_group int32[G, S] and
    scales_group float32[G, S] contiguous. What the modules share (x, the dispatch vectors, the
    group tensors' dtype and device) is checked once, through module 0."""
    num_modules = len(lora_b_list)
    if not 1 <= num_modules <= max_modules or len(outs) != num_modules:
        raise ValueError(
            f"{op}: 1 to {max_modules} modules, as many outs as lora_b; "
            f"got {num_modules} lora_b and {len(outs)} outs"
        )
    if lora_a_group.dim() != 4 or lora_a_group.shape[0] != num_modules or not lora_a_group.is_contiguous():
        raise ValueError(
            f"{op}: lora_a_group must be contiguous [G={num_modules}, S, R, D_in]; got {list(lora_a_group.shape)}"
        )
    shape = (num_modules, meta.num_slots)
    for name, t, dtype in (("ranks_group", ranks_group, torch.int32), ("scales_group", scales_group, torch.float32)):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous {dtype}{list(shape)}; got {t.dtype}{list(t.shape)}")
    rank = lora_a_group.shape[2]
    check_shrink_args(op, x, lora_a_group[0], ranks_group[0], meta)
    for g in range(num_modules):
        if lora_b_list[g].shape[2:] != (rank,):
            raise ValueError(f"{op}: lora_b {g} has rank {lora_b_list[g].shape[2:]}, lora_a {rank}")
        if g == 0:
            check_expand_args(op, None, lora_b_list[0], ranks_group[0], scales_group[0], meta, outs[0])
            continue
        _check_expand_module(op, lora_b_list[g], meta, outs[g])
        if outs[g].device != x.device:
            raise ValueError(f"{op}: out {g} is on {outs[g].device}, x on {x.device}")


def launch_options(op: str, block_k: int | None, block_n: int | None, num_warps: int | None,
                   num_stages: int | None = None) -> dict:
    """Check caller-given tile sizes (powers of two >= 16) and launch options; returns the
    launch options that were given (num_warps, num_stages) as keyword arguments."""
    for name, value in (("block_k", block_k), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{op}: {name} must be a power of two >= 16; got {value}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{op}: num_warps must be 1, 2, 4, 8 or 16; got {num_warps}")
    if num_stages is not None and not 1 <= num_stages <= 6:
        raise ValueError(f"{op}: num_stages must be 1 to 6; got {num_stages}")
    return {key: value for key, value in (("num_warps", num_warps), ("num_stages", num_stages)) if value is not None}


def check_int32_extents(op: str, extents) -> None:
    """Refuse any (name, elements spanned) of `extents` a kernel's int32 offsets cannot reach."""
    for name, size in extents:
        if size >= 2**31:
            raise ValueError(f"{op}: {name} spans 2**31 elements or more (the kernels' offsets are int32)")


def module_args(lora_b_list: list[torch.Tensor], outs: list[torch.Tensor], max_modules: int) -> list:
    """Per-module kernel arguments (lora_b, out, D_out, lora_b strides 0 and 1, out row stride)
    for `max_modules` slots; slots past the group repeat module 0 with D_out 0 (never read)."""
    args = []
    for g in range(max_modules):
        b, out = (lora_b_list[g], outs[g]) if g < len(lora_b_list) else (lora_b_list[0], outs[0])
        args += [b, out, b.shape[1] if g < len(lora_b_list) else 0, b.stride(0), b.stride(1), out.stride(0)]
    return args
