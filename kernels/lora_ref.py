"""Pure-torch per-token LoRA ops: the CPU backend and the oracle for the Triton kernels.

Both paths avoid per-token Python loops. The decode path gathers each pair's adapter weights
(index_select + bmm); the prefill path walks the per-slot segments of the dispatch metadata
(index_select the slot's tokens, one matmul per slot, index_add back), so work grows with the
number of tokens, not with tokens x adapters. Padding past a slot's rank is sliced off, never
multiplied.

Legend: T tokens, K choices, S slots, R max rank, N = T * K pairs, D_in / D_out features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.meta import DispatchMeta


def _check(x: torch.Tensor, stacked: torch.Tensor, name: str, grouped: bool = False) -> None:
    """x is [T, D]; stacked is [S, ., .], or [G, S, ., .] when grouped."""
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [T, D]; got shape {tuple(x.shape)}")
    if stacked.dim() != 3 + grouped:
        want = "[G, S, ., .]" if grouped else "[S, ., .]"
        raise ValueError(f"{name}: stacked weights must be {want}; got shape {tuple(stacked.shape)}")


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: DispatchMeta,
) -> torch.Tensor:
    """Project every (token, k) pair onto its slot's lora_a.

    Semantics: h[t*K+k, :r] = x[t] @ lora_a_stacked[s, :r].T with s = slots[t*K+k], r = rank[s];
    h is zero past r and for s == -1.

    Args:
        x: [T, D_in] activations (fp32, bf16 or fp16).
        lora_a_stacked: [S, R, D_in] slot-stacked lora_a, same dtype as x.
        slot_ranks: int32[S] rank of each slot (0 = empty).
        meta: dispatch metadata of the step.
    Returns:
        h: float32[N, R].
    """
    _check(x, lora_a_stacked, "lora_shrink")
    ranks = slot_ranks.tolist()
    h = x.new_zeros(meta.num_pairs, lora_a_stacked.shape[1], dtype=torch.float32)
    for seg in _segments(meta):
        r = ranks[seg.slot]
        if r:
            h[seg.rows, :r] = (x.index_select(0, seg.tokens) @ lora_a_stacked[seg.slot, :r].T).float()
    return h


def lora_expand_ref(
    h: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: DispatchMeta,
    out: torch.Tensor,
) -> torch.Tensor:
    """Add every pair's weighted lora_b projection into its token's output row.

    Semantics: out[t] += sum_k weights[t*K+k] * scale[s] * h[t*K+k, :r] @ lora_b_stacked[s, :, :r].T
    with s = slots[t*K+k], r = rank[s]; pairs with s == -1 add nothing.

    Args:
        h: float32[N, R] from lora_shrink.
        lora_b_stacked: [S, D_out, R] slot-stacked lora_b.
        slot_ranks: int32[S]; slot_scales: float32[S].
        meta: dispatch metadata of the step.
        out: [T, D_out], updated in place and returned.
    """
    _check(out, lora_b_stacked, "lora_expand")
    ranks, scales = slot_ranks.tolist(), slot_scales.tolist()
    for seg in _segments(meta):
        r = ranks[seg.slot]
        if not r:
            continue
        coef = scales[seg.slot] if seg.weights is None else seg.weights * scales[seg.slot]
        delta = (h.index_select(0, seg.rows)[:, :r] * coef).to(out.dtype) @ lora_b_stacked[seg.slot, :, :r].T
        out.index_add_(0, seg.tokens, delta)
    return out


def lora_apply_ref(
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: DispatchMeta,
    out: torch.Tensor,
    path: str = "auto",
) -> torch.Tensor:
    """shrink then expand without materialising h for all pairs (what the CPU backend runs).

    Semantics: out[t] += sum_k w[t,k] * scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T.
    Shapes as in `lora_shrink_ref` and `lora_expand_ref`. Differentiable in x and meta.weights.

    path: "prefill" walks the per-slot segments; "decode" gathers each pair's weights (four ops
    whatever the number of slots, which pays off where launches are dear); "dense" runs every
    token through the span of active slots with zero weights where it is not routed (a fixed
    handful of ops, at span/K times the LoRA FLOPs); "auto" takes decode for decode-size steps
    on CUDA, dense for decode-size CPU steps unless every routed token lies in one contiguous run
    of one slot, and prefill elsewhere. On CPU the gather loses at every size (T=16, D=1024:
    1.4 ms against 0.05 ms for the segment walk), since it copies each pair's weights.
    """
    _check(x, lora_a_stacked, "lora_apply")
    path = _resolve_path(path, meta, x)
    if path == "decode":
        return _apply_gathered(x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta, out)
    if path == "dense":
        _apply_dense(x, lora_a_stacked[None], [lora_b_stacked], slot_ranks[None], slot_scales[None], meta, [out])
        return out
    ranks, scales = slot_ranks.tolist(), slot_scales.tolist()
    for seg in _segments(meta):
        r = ranks[seg.slot]
        if r == 0:
            continue
        a, b, scale = lora_a_stacked[seg.slot, :r], lora_b_stacked[seg.slot, :, :r], scales[seg.slot]
        if seg.runs is not None:
            # Contiguous token ranges (requests grouped by adapter): views, no gather or scatter.
            for t0, t1, i0 in seg.runs:
                hs = x[t0:t1] @ a.T
                if seg.weights is not None:
                    hs = hs * seg.weights[i0 : i0 + t1 - t0].to(x.dtype)
                out[t0:t1].addmm_(hs, b.T, alpha=scale)
            continue
        coef = scale if seg.weights is None else (seg.weights * scale).to(x.dtype)
        hs = (x.index_select(0, seg.tokens) @ a.T) * coef
        out.index_add_(0, seg.tokens, hs @ b.T)
    return out


def lora_apply_shared_ref(
    x: torch.Tensor,
    lora_a_group: torch.Tensor,
    lora_b_list: list[torch.Tensor],
    ranks_group: torch.Tensor,
    scales_group: torch.Tensor,
    meta: DispatchMeta,
    outs: list[torch.Tensor],
    path: str = "auto",
    rank_scales: torch.Tensor | None = None,
    cache: dict | None = None,
) -> list[torch.Tensor]:
    """`lora_apply_ref` for G modules that read the same x (q/k/v, gate/up).

    Semantics: outs[g][t] += sum_k w[t,k] * scales_group[g, s] * (x[t] @ lora_a_group[g, s, :r].T)
    @ lora_b_list[g][s, :, :r].T with s = slots[t*K+k], r = ranks_group[g, s]; pairs with s == -1
    add nothing.

    Args:
        x: [T, D_in] fp32 / bf16 / fp16.
        lora_a_group: [G, S, R, D_in]; module g's lora_a_stacked is lora_a_group[g].
        lora_b_list: G tensors [S, D_out_g, R] (any strides; [S, R, D_out] storage makes the
            dense expand one plain matmul on a view).
        ranks_group: int32[G, S]; scales_group: float32[G, S].
        outs: G tensors [T, D_out_g], updated in place (column slices of one output are fine).
        rank_scales: optional float32[G, S, R] = scale below each slot's rank, 0 past it (the
            hot-set keeps it current; derived from ranks and scales when None).
        cache: optional dict the caller keeps for these buffers across steps (a layer's), where
            the dense path keeps its views of them per slot span: the buffers must stay at their
            addresses and change only in place, as the hot-set's do.
    The dense path shrinks for every module and slot with one matmul; the other paths run
    `lora_apply_ref` per module.
    """
    _check(x, lora_a_group, "lora_apply_shared", grouped=True)
    path = _resolve_path(path, meta, x)
    if path == "dense":
        _apply_dense(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales, cache)
        return outs
    for g, (lora_b, out) in enumerate(zip(lora_b_list, outs)):
        lora_apply_ref(x, lora_a_group[g], lora_b, ranks_group[g], scales_group[g], meta, out, path)
    return outs


# A segment split into more contiguous token runs than this is gathered and scattered instead.
MAX_RUNS = 4
# The dense path runs tokens through at most this many consecutive slots.
MAX_DENSE_SPAN = 16
# Prefill steps whose tokens form contiguous runs go dense up to this many times the LoRA FLOPs
# of walking each slot's runs (span / top_k).
DENSE_PREFILL_WASTE = 2


def _resolve_path(path: str, meta: DispatchMeta, x: torch.Tensor) -> str:
    if path not in ("auto", "decode", "prefill", "dense"):
        raise ValueError(f"path must be 'auto', 'decode', 'prefill' or 'dense'; got {path!r}")
    if path != "auto":
        return path
    key = ("torch_path", x.device.type)  # the same for every layer of the step
    if key not in meta.backend_cache:
        meta.backend_cache[key] = _auto_path(meta, x)
    return meta.backend_cache[key]


def _auto_path(meta: DispatchMeta, x: torch.Tensor) -> str:
    if x.is_cuda:
        return "decode" if meta.is_decode else "prefill"
    if meta.weights.requires_grad:
        return "prefill"
    used = [slot for slot, count in enumerate(meta.host_counts()) if count]
    if not used or used[-1] - used[0] + 1 > MAX_DENSE_SPAN:
        return "prefill"
    # One contiguous run is two matmuls on views: nothing is cheaper.
    if len(used) == 1:
        runs = _segments(meta)[0].runs
        if runs is not None and len(runs) == 1:
            return "prefill"
    if meta.is_decode:
        return "dense"
    span = used[-1] - used[0] + 1
    # Prefill-size steps: tokens scattered over slots (per-token routing) are cheaper as a few
    # large dense matmuls than as a gather, two matmuls and a scatter per slot. Contiguous runs
    # (requests grouped by adapter) go dense only while that multiplies the LoRA FLOPs by at most
    # DENSE_PREFILL_WASTE: 512 prompt tokens over 4 rank-16 adapters, one adapter per request,
    # prefill 14% faster walking the runs than dense at hidden 256 and alike at hidden 1024 (2-core
    # CPU machine, 15 interleaved runs).
    # (Tokens with several choices have no runs: no need to build the segments to know.)
    scattered = meta.top_k > 1 or any(seg.runs is None for seg in _segments(meta))
    return "dense" if scattered or span <= DENSE_PREFILL_WASTE * meta.top_k else "prefill"


def _apply_dense(x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, rank_scales=None, cache=None):
    """Every token through slots lo..hi-1 of every module of the group at once; pairs not routed
    to a slot weigh zero there. Past a slot's rank the weight is zero too, so finite padding
    contents never reach the output (the hot-set keeps padding at zero anyway)."""
    lo, hi, coef = _dense_coef(meta)
    if hi == lo:
        return
    key = ("torch_dense", lo, hi)
    operands = None if cache is None else cache.get(key)
    if operands is None:
        operands = _dense_operands(lora_a_group, lora_b_list, ranks_group, scales_group, rank_scales, lo, hi)
        if cache is not None and operands.views_only:
            cache[key] = operands
    groups, span, rank = lora_a_group.shape[0], hi - lo, lora_a_group.shape[2]
    h = torch.bmm(x.expand(groups, -1, -1), operands.a)  # [G, T, span * R]
    # Weight each (token, slot) block by the token's routing weight there and each rank column
    # by its slot's scale (0 past the rank), in place.
    h4 = h.view(groups, -1, span, rank)
    h4.mul_(operands.rank_scales)
    h4.mul_(coef[:, :, None])
    for g, (b, out) in enumerate(zip(operands.b, outs)):
        out.addmm_(h[g], b)


@dataclass
class _DenseOperands:
    """The dense path's operands for one slot span of one group of buffers."""

    a: torch.Tensor  # [G, D_in, span * R]: every module's lora_a over the span, transposed
    b: list[torch.Tensor]  # G tensors [span * R, D_out_g]
    rank_scales: torch.Tensor  # float32[G, 1, span, R]
    views_only: bool  # every operand is a view of the buffers (so a caller may keep them)


def _dense_operands(lora_a_group, lora_b_list, ranks_group, scales_group, rank_scales, lo, hi) -> _DenseOperands:
    groups, _, rank, d_in = lora_a_group.shape
    span = hi - lo
    derived = rank_scales is None  # computed here from ranks and scales: not a view of a buffer
    if derived:
        in_rank = torch.arange(rank, device=lora_a_group.device) < ranks_group[:, lo:hi, None]
        rank_scales = torch.where(in_rank, scales_group[:, lo:hi, None], 0.0)  # [G, span, R]
    else:
        rank_scales = rank_scales[:, lo:hi]
    a = lora_a_group[:, lo:hi].reshape(groups, span * rank, d_in).transpose(1, 2)  # a view: lo:hi is outermost
    # [span * R, D_out]: a view when lora_b's storage is [S, R, D_out], else a copy of the span.
    b = [lora_b[lo:hi].transpose(1, 2).reshape(span * rank, lora_b.shape[1]) for lora_b in lora_b_list]
    views = not derived and all(
        m.untyped_storage().data_ptr() == lora_b.untyped_storage().data_ptr() for m, lora_b in zip(b, lora_b_list)
    )
    return _DenseOperands(a, b, rank_scales[:, None], views)


def _dense_coef(meta: DispatchMeta) -> tuple[int, int, torch.Tensor]:
    """(lo, hi, float32[T, hi - lo] summed weight of each token on each slot), once per step."""
    cached = meta.backend_cache.get("torch_dense")
    if cached is None:
        used = [slot for slot, count in enumerate(meta.host_counts()) if count]
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        if meta.host_route is not None:  # routes known on the host: one copy, no device ops
            rows = [[0.0] * (hi - lo) for _ in range(meta.num_tokens)]
            for pair, (slot, weight) in enumerate(zip(*meta.host_route)):
                if slot >= 0:
                    rows[pair // meta.top_k][slot - lo] += weight
            coef = torch.tensor(rows, dtype=torch.float32).to(meta.slots.device)
        else:
            coef = torch.zeros(meta.num_tokens, hi - lo, device=meta.slots.device)
            valid = meta.slots >= 0
            pairs = torch.arange(meta.num_pairs, device=meta.slots.device)[valid]
            tokens = torch.div(pairs, meta.top_k, rounding_mode="floor")
            coef.index_put_((tokens, meta.slots[valid].long() - lo), meta.weights[valid], accumulate=True)
        cached = meta.backend_cache["torch_dense"] = (lo, hi, coef)
    return cached


@dataclass
class _Segment:
    """One slot's pairs of the step, prepared once for every layer."""

    slot: int
    rows: torch.Tensor  # long[n] pair ids (t * K + k) of the segment
    tokens: torch.Tensor  # long[n] token of each pair
    weights: torch.Tensor | None  # float32[n, 1] pair weights; None when all are 1 (and need no grad)
    runs: list[tuple[int, int, int]] | None  # (t0, t1, first pair index) covering the segment, or None


def _segments(meta: DispatchMeta) -> list[_Segment]:
    cached = meta.backend_cache.get("torch_segments")
    if cached is not None:
        return cached
    if meta.host_route is not None and not meta.weights.requires_grad:
        segments = meta.backend_cache["torch_segments"] = _host_segments(meta)
        return segments
    segments = []
    grad = meta.weights.requires_grad
    for slot, start, end in meta.host_segments():
        rows = meta.sorted_pairs[start:end].long()
        tokens = torch.div(rows, meta.top_k, rounding_mode="floor") if meta.top_k > 1 else rows
        weights = meta.weights.index_select(0, rows).unsqueeze(1)
        if not grad and bool((weights == 1).all()):
            weights = None
        runs = None if grad or meta.top_k > 1 else _runs(tokens.tolist())
        segments.append(_Segment(slot, rows, tokens, weights, runs))
    meta.backend_cache["torch_segments"] = segments
    return segments


def _host_segments(meta: DispatchMeta) -> list[_Segment]:
    """`_segments` from the routes the plan built on the host: no device reads."""
    slots, weights = meta.host_route
    device, k = meta.slots.device, meta.top_k
    pairs_of: dict[int, list[int]] = {}
    for pair, slot in enumerate(slots):
        if slot >= 0:
            pairs_of.setdefault(slot, []).append(pair)
    segments = []
    for slot in sorted(pairs_of):
        pairs = pairs_of[slot]
        tokens = [p // k for p in pairs]
        seg_weights = [weights[p] for p in pairs]
        w = None if all(v == 1 for v in seg_weights) else torch.tensor(seg_weights, device=device).unsqueeze(1)
        rows = torch.tensor(pairs, dtype=torch.int64, device=device)
        token_rows = rows if k == 1 else torch.tensor(tokens, dtype=torch.int64, device=device)
        segments.append(_Segment(slot, rows, token_rows, w, _runs(tokens) if k == 1 else None))
    return segments


def _runs(tokens: list[int]) -> list[tuple[int, int, int]] | None:
    """Maximal ranges of consecutive tokens, or None if there are more than MAX_RUNS."""
    runs, i0 = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i] != tokens[i - 1] + 1:
            runs.append((tokens[i0], tokens[i - 1] + 1, i0))
            if len(runs) > MAX_RUNS:
                return None
            i0 = i
    return runs


def _apply_gathered(x, lora_a_stacked, lora_b_stacked, slot_ranks, slot_scales, meta, out):
    """Decode path: gather each pair's lora_a / lora_b and run two batched matvecs."""
    ranks = slot_ranks.tolist()
    used = [s for s, c in enumerate(meta.host_counts()) if c and ranks[s] > 0]
    if not used:
        return out
    r = max(ranks[s] for s in used)
    valid = meta.slots >= 0
    index = meta.slots.clamp(min=0).long()
    # Pairs with slot -1 or an empty slot get weight zero; their gathered weights are finite.
    coef = meta.weights * slot_scales.index_select(0, index) * valid
    coef = coef * (slot_ranks.index_select(0, index) > 0)
    pairs = torch.arange(meta.num_pairs, device=x.device)
    tokens = torch.div(pairs, meta.top_k, rounding_mode="floor")
    a = lora_a_stacked.index_select(0, index)[:, :r]  # [N, r, D_in]
    b = lora_b_stacked.index_select(0, index)[:, :, :r]  # [N, D_out, r]
    h = torch.bmm(a, x.index_select(0, tokens).unsqueeze(2)) * coef.to(x.dtype).view(-1, 1, 1)
    # A lower-rank slot's columns past its rank are padding: mask them rather than trust zeros.
    in_rank = torch.arange(r, device=x.device) < slot_ranks.index_select(0, index).unsqueeze(1)
    h = torch.where(in_rank.unsqueeze(2), h, torch.zeros((), dtype=h.dtype, device=h.device))
    out.index_add_(0, tokens, torch.bmm(b, h).squeeze(2))
    return out
