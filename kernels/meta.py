"""Per-step dispatch metadata: which (token, k) pairs go to which hot-set slot.

Built once per step from a routing plan and shared by every MoLoRA layer of the forward pass,
the same sort -> histogram -> cumsum that Mixture-of-Experts dispatch uses. The tensors live in
buffers allocated once (`DispatchBuffers`), so a captured CUDA graph that reads them stays valid
from step to step; only their contents change.

Legend: T tokens, K choices per token, S hot-set slots, N = T * K (token, k) pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from kernels import cpu_ext

# At or below this many (token, k) pairs a step takes the decode path (per-pair gather), above it
# the prefill path (grouped tiles over the sorted per-slot segments).
DECODE_MAX_PAIRS = 64


@dataclass
class DispatchMeta:
    """Dispatch metadata of one step. Pair p = t * K + k is token t's k-th choice."""

    num_tokens: int  # T
    top_k: int  # K
    num_slots: int  # S
    slots: torch.Tensor  # int32[N]    hot-set slot of each pair, -1 = no adapter
    weights: torch.Tensor  # float32[N]  mixing weight of each pair
    sorted_pairs: torch.Tensor  # int32[N]    pair ids ordered by slot, slot -1 pairs last
    slot_counts: torch.Tensor  # int32[S]    pairs routed to each slot
    slot_offsets: torch.Tensor  # int32[S+1]  start of each slot's segment in sorted_pairs
    _host_counts: list[int] | None = field(default=None, repr=False)
    # slots[N] and weights[N] as host lists when the routes were known on the host (`build_host`):
    # backends derive their per-step values from these without reading the device.
    host_route: tuple[list[int], list[float]] | None = field(default=None, repr=False)
    # Rows per tile for the grouped (prefill-path) kernels; None = picked from the busiest slot
    # (one host sync). Set it for a step captured in a CUDA graph.
    block_m: int | None = None
    # Per-step values a backend derives once and every layer of the step reuses.
    backend_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def is_decode(self) -> bool:
        return self.num_pairs <= DECODE_MAX_PAIRS

    def host_counts(self) -> list[int]:
        """Pairs per slot on the host (one device sync per step, cached for all layers)."""
        if self._host_counts is None:
            self._host_counts = self.slot_counts.tolist()
        return self._host_counts

    def host_segments(self) -> list[tuple[int, int, int]]:
        """(slot, start, end) of every non-empty segment of `sorted_pairs`, in slot order."""
        segments, start = [], 0
        for slot, count in enumerate(self.host_counts()):
            if count:
                segments.append((slot, start, start + count))
                start += count
        return segments

    def max_pairs_per_slot(self) -> int:
        return max(self.host_counts(), default=0)


def build_dispatch(
    slots: torch.Tensor,
    weights: torch.Tensor,
    num_slots: int,
    out: "DispatchBuffers | None" = None,
) -> DispatchMeta:
    """Sort pairs by slot, count them per slot, take offsets.

    Args:
        slots: int[T, K] hot-set slot per token and choice, -1 = no adapter.
        weights: float[T, K] mixing weight per token and choice.
        num_slots: S, the hot-set size (slot ids are in [0, S)).
        out: preallocated buffers to fill in place; None allocates fresh tensors (training).

    Weights that require grad are referenced, not copied, so a learned router trains through
    them.
    """
    if slots.dim() != 2 or weights.shape != slots.shape:
        raise ValueError(
            f"slots and weights must both be [T, K]; got {tuple(slots.shape)} and {tuple(weights.shape)}"
        )
    num_tokens, top_k = slots.shape
    n = num_tokens * top_k
    device = slots.device
    if out is None:
        flat_slots = slots.reshape(-1).to(torch.int32).contiguous()
        sorted_pairs = torch.empty(n, dtype=torch.int32, device=device)
        counts = torch.empty(num_slots, dtype=torch.int32, device=device)
        offsets = torch.empty(num_slots + 1, dtype=torch.int32, device=device)
    else:
        out.check_fits(num_tokens, top_k, num_slots)
        flat_slots, flat_weights, sorted_pairs = out.views(n)
        if not _same_memory(flat_slots, slots):  # (a routing plan's routes are these buffers already)
            flat_slots.copy_(slots.reshape(-1))
        counts, offsets = out.slot_counts, out.slot_offsets
    if weights.requires_grad or out is None:
        flat_weights = weights.reshape(-1).float()
    elif not _same_memory(flat_weights, weights):
        flat_weights.copy_(weights.reshape(-1))

    compiled = cpu_ext.module() if device.type == "cpu" else None
    if compiled is not None:  # one call on CPU for the dozen small ops below
        compiled.dispatch_sort(flat_slots, sorted_pairs, counts, offsets)
    else:
        _dispatch_sort(flat_slots, num_slots, sorted_pairs, counts, offsets)
    return DispatchMeta(
        num_tokens=num_tokens,
        top_k=top_k,
        num_slots=num_slots,
        slots=flat_slots,
        weights=flat_weights,
        sorted_pairs=sorted_pairs,
        slot_counts=counts,
        slot_offsets=offsets,
    )


def _same_memory(flat: torch.Tensor, t: torch.Tensor) -> bool:
    """True where t [T, K] is contiguous over exactly the memory of flat [T * K]."""
    return t.data_ptr() == flat.data_ptr() and t.is_contiguous() and t.numel() == flat.numel() and t.dtype == flat.dtype


def _dispatch_sort(flat_slots, num_slots, sorted_pairs, counts, offsets) -> None:
    """sorted_pairs, counts and offsets of `build_dispatch` from flat_slots, with device ops only."""
    device = flat_slots.device
    # Slot -1 sorts after every real slot and falls outside the histogram.
    key = flat_slots.long().masked_fill(flat_slots < 0, num_slots)
    sorted_pairs.copy_(torch.argsort(key, stable=True))
    # A scatter-add histogram, not bincount: CUDA's bincount reads the maximum back to the host,
    # which a CUDA graph cannot capture (the gate's decode step builds this inside one).
    histogram = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
    histogram.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    counts.copy_(histogram[:num_slots])
    # A fill, not `offsets[0] = 0`: on CUDA that assignment copies a CPU scalar, which a CUDA
    # graph capture refuses.
    offsets[:1].zero_()
    torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])


class DispatchBuffers:
    """Dispatch tensors allocated once at start-up for up to `max_tokens` x `max_k` pairs."""

    def __init__(self, max_tokens: int, max_k: int, num_slots: int, device: torch.device | str = "cpu"):
        if max_tokens < 1 or max_k < 1 or num_slots < 1:
            raise ValueError(
                f"max_tokens, max_k and num_slots must be >= 1; got {max_tokens}, {max_k}, {num_slots}"
            )
        n = max_tokens * max_k
        self.max_tokens, self.max_k, self.num_slots = max_tokens, max_k, num_slots
        self.slots = torch.full((n,), -1, dtype=torch.int32, device=device)  # int32[T_max*K_max]
        self.weights = torch.zeros(n, dtype=torch.float32, device=device)  # float32[T_max*K_max]
        self.sorted_pairs = torch.zeros(n, dtype=torch.int32, device=device)  # int32[T_max*K_max]
        self.slot_counts = torch.zeros(num_slots, dtype=torch.int32, device=device)  # int32[S]
        self.slot_offsets = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)  # int32[S+1]
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """slots[:n], weights[:n] and sorted_pairs[:n], made once per n (views of fixed buffers)."""
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = (self.slots[:n], self.weights[:n], self.sorted_pairs[:n])
        return views

    def check_fits(self, num_tokens: int, top_k: int, num_slots: int) -> None:
        if num_tokens > self.max_tokens or top_k > self.max_k or num_slots != self.num_slots:
            raise ValueError(
                f"step of T={num_tokens}, K={top_k}, S={num_slots} does not fit dispatch buffers "
                f"of T<={self.max_tokens}, K<={self.max_k}, S={self.num_slots}"
            )

    def build(self, slots: torch.Tensor, weights: torch.Tensor) -> DispatchMeta:
        return build_dispatch(slots, weights, self.num_slots, out=self)

    def build_host(self, slots: list[int], weights: list[float], num_tokens: int, top_k: int) -> DispatchMeta:
        """`build` for routes known on the host (flat lists of N = T * K pairs, pair t * K + k):
        the same sort and histogram in Python, one copy into each buffer, and a DispatchMeta
        that never reads the device back (`host_counts` and `host_route` are filled)."""
        n = num_tokens * top_k
        if len(slots) != n or len(weights) != n:
            raise ValueError(f"expected {n} slots and weights for T={num_tokens}, K={top_k}; got {len(slots)} and {len(weights)}")
        self.check_fits(num_tokens, top_k, self.num_slots)
        bad = [slot for slot in (min(slots), max(slots)) if not -1 <= slot < self.num_slots] if slots else []
        if bad:
            raise ValueError(f"slot {bad[0]} is outside [-1, {self.num_slots})")
        self.slots[:n].copy_(torch.tensor(slots, dtype=torch.int32))
        self.weights[:n].copy_(torch.tensor(weights, dtype=torch.float32))
        compiled = cpu_ext.module() if self.slots.device.type == "cpu" else None
        if compiled is not None:  # the sort in one call, its counts read back (host memory: no sync)
            compiled.dispatch_sort(self.slots[:n], self.sorted_pairs[:n], self.slot_counts, self.slot_offsets)
            counts = self.slot_counts.tolist()
        else:
            counts = [0] * self.num_slots
            for slot in slots:
                if slot >= 0:
                    counts[slot] += 1
            last = self.num_slots  # slot -1 sorts after every real slot, as in build_dispatch
            order = sorted(range(n), key=lambda p: last if slots[p] < 0 else slots[p])
            self.sorted_pairs[:n].copy_(torch.tensor(order, dtype=torch.int32))
            self.slot_counts.copy_(torch.tensor(counts, dtype=torch.int32))
            self.slot_offsets.copy_(torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32))
        return DispatchMeta(
            num_tokens=num_tokens, top_k=top_k, num_slots=self.num_slots, slots=self.slots[:n], weights=self.weights[:n],
            sorted_pairs=self.sorted_pairs[:n], slot_counts=self.slot_counts, slot_offsets=self.slot_offsets,
            _host_counts=counts, host_route=(list(slots), list(weights)),
        )
