"""The routing plan of one step: slots[T, K] and weights[T, K] for every token of the batch.

Requests fill their rows through their routers; routers that read the hidden state (the gate)
are resolved once the step's embeddings exist. `finalize` then builds the dispatch metadata
once, into buffers allocated at start-up, and every MoLoRA layer of the step shares it.

Routing costs a few operations per step, not per request: constant routes (one adapter, a
mixture) are written from the host in one copy, and requests whose routers share a batch key
(all requests on one gate router) are routed in one call over all their tokens. A step whose
every route is constant is also sorted and counted on the host (`DispatchBuffers.build_host`), so
no layer reads the device to learn the per-slot counts; a decode step whose routes are the step
before's (the same requests on the same adapters) reuses that step's metadata as it is.
"""

from __future__ import annotations

import torch

from kernels import DispatchBuffers, DispatchMeta, build_dispatch
from molora_core.routing.gate import GateRouter
from molora_core.routing.routers import Router


class RoutingPlan:
    """Per-token plan for up to `max_tokens` tokens with up to `max_k` choices each.

    With `preallocated=False` every step gets fresh tensors and no dispatch buffers, so a
    learned router can backpropagate through the plan's weights (training).
    """

    def __init__(self, max_tokens: int, max_k: int, num_slots: int, device="cpu", preallocated: bool = True):
        self.max_tokens, self.max_k, self.num_slots = max_tokens, max_k, num_slots
        self.device = torch.device(device)
        self.dispatch_buffers = DispatchBuffers(max_tokens, max_k, num_slots, self.device) if preallocated else None
        if self.dispatch_buffers is not None:
            # The plan's routes are the dispatch buffers' own slots and weights: routers write them
            # in place, and the dispatch build sorts them where they are.
            self._slots_flat, self._weights_flat = self.dispatch_buffers.slots, self.dispatch_buffers.weights
        else:
            self._slots_flat = torch.full((max_tokens * max_k,), -1, dtype=torch.int32, device=self.device)
            self._weights_flat = torch.zeros(max_tokens * max_k, dtype=torch.float32, device=self.device)
        self.num_tokens, self.top_k = 0, 1
        self._constant: list[tuple[int, int, tuple[int, ...], tuple[float, ...]]] = []
        self._pending: list[tuple[int, int, Router, torch.Tensor]] = []
        # The last host-built step's routes and metadata: a decode step whose requests and routes
        # are those of the step before reuses it as it is (its buffers still hold its routes).
        # Whatever else writes the dispatch buffers goes through `resolve` or `route_static`,
        # which drop it.
        self._host_step: tuple[tuple, DispatchMeta] | None = None

    def begin(self, num_tokens: int, top_k: int) -> None:
        """Start a step of `num_tokens` tokens with `top_k` choices; every row no router is assigned
        stays on the base model (-1). The buffers are written when the step resolves, not here:
        rows that no route covers are cleared then, so a step whose routes cover every row (a
        batch on one gate router) writes them once, and a failed step leaves them as they were."""
        if not 0 < num_tokens <= self.max_tokens or not 0 < top_k <= self.max_k:
            raise ValueError(
                f"step of T={num_tokens}, K={top_k} does not fit a plan of T<={self.max_tokens}, K<={self.max_k}"
            )
        self.num_tokens, self.top_k = num_tokens, top_k
        n = num_tokens * top_k
        if self.dispatch_buffers is None:
            self._slots_flat = torch.full((n,), -1, dtype=torch.int32, device=self.device)
            self._weights_flat = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._constant.clear()
        self._pending.clear()

    @property
    def slots(self) -> torch.Tensor:
        """int32[T, K] view of the current step."""
        return self._slots_flat[: self.num_tokens * self.top_k].view(self.num_tokens, self.top_k)

    @property
    def weights(self) -> torch.Tensor:
        """float32[T, K] view of the current step."""
        return self._weights_flat[: self.num_tokens * self.top_k].view(self.num_tokens, self.top_k)

    def assign(self, start: int, router: Router | None, token_ids: torch.Tensor) -> None:
        """Route tokens [start, start + len(token_ids)) of the step; None leaves them on the base model."""
        end = start + token_ids.shape[0]
        if start < 0 or end > self.num_tokens:
            raise ValueError(f"rows [{start}, {end}) fall outside the step's {self.num_tokens} tokens")
        if router is None:
            return
        if router.top_k > self.top_k:
            raise ValueError(f"router chooses {router.top_k} adapters per token but the step has K={self.top_k}")
        constant = router.constant()
        if constant is not None and end > start:
            self._constant.append((start, end, *constant))
        else:
            self._pending.append((start, end, router, token_ids))

    @property
    def needs_hidden(self) -> bool:
        return any(router.needs_hidden for _, _, router, _ in self._pending)

    def finalize(self, hidden: torch.Tensor | None = None) -> DispatchMeta:
        """Resolve routers that read `hidden` [T, D] (the step's embeddings), then build dispatch metadata."""
        if self.needs_hidden and hidden is None:
            raise ValueError("the plan has gate-routed tokens; finalize needs the step's hidden state")
        if self._constant and not self._pending and self.dispatch_buffers is not None:
            # Every route is known on the host: sort and count there too (no device sort, no sync).
            key = (self.num_tokens, self.top_k, tuple(self._constant))
            if self._host_step is not None and self._host_step[0] == key:
                meta = self._host_step[1]  # the step before's routes: its buffers hold them still
                self._constant.clear()
            else:
                slots, weights = self._constant_lists()
                meta = self.dispatch_buffers.build_host(slots, weights, self.num_tokens, self.top_k)
                self._host_step = (key, meta)
            return meta  # (its slots and weights are the plan's)
        self.resolve(hidden)
        if self.dispatch_buffers is None:
            return build_dispatch(self.slots, self.weights, self.num_slots)
        return self.dispatch_buffers.build(self.slots, self.weights)

    def route_static(self, hidden: torch.Tensor, gate: GateRouter, lookup: torch.Tensor,
                     rows: torch.Tensor) -> DispatchMeta:
        """Route the rows flagged in `rows` (bool[T]) through `gate` over the step's embeddings
        `hidden` [T, D] (adapter index -> slot through `lookup`, int32[A] on the device), keep
        every other row as `resolve` left it, and build the dispatch metadata, with device ops
        only: no host reads and no host-to-device copies, so a CUDA graph can capture it (the
        fixed-shape decode step of a gate router)."""
        if self.dispatch_buffers is None:
            raise ValueError("route_static writes the preallocated dispatch buffers; this plan has none")
        self._host_step = None  # (its captured replays write them too: the step runner resolves first)
        index, weights = gate(hidden)  # [T, k]
        k, flagged = index.shape[1], rows[:, None]
        slots = self.slots[:, :k]
        slots.copy_(torch.where(flagged, lookup[index], slots))
        self.weights[:, :k].copy_(torch.where(flagged, weights, self.weights[:, :k]))
        return self.dispatch_buffers.build(self.slots, self.weights)

    def resolve(self, hidden: torch.Tensor | None = None) -> None:
        """Write every assigned row's slots and weights (`finalize` without the dispatch build)."""
        if self.needs_hidden and hidden is None:
            raise ValueError("the plan has gate-routed tokens; resolving them needs the step's hidden state")
        self._host_step = None  # the dispatch buffers get this step's routes
        if self._constant:
            self._write_constant()  # every pair: the constant routes, base elsewhere
        elif self.dispatch_buffers is not None and not self._pending_cover_all():
            n = self.num_tokens * self.top_k
            self._slots_flat[:n].fill_(-1)
            self._weights_flat[:n].zero_()
        batches: dict[object, list[tuple[int, int, Router, torch.Tensor]]] = {}
        for i, entry in enumerate(self._pending):
            key = entry[2].batch_key()
            batches.setdefault(("single", i) if key is None else key, []).append(entry)
        for entries in batches.values():
            router, token_ids = entries[0][2], None
            if router.reads_ids:  # (the gate reads only the hidden state: no per-request ids to gather)
                ids = [token_ids.to(self.device) for _, _, _, token_ids in entries]
                token_ids = ids[0] if len(ids) == 1 else torch.cat(ids)
            spans = [(start, end) for start, end, _, _ in entries]
            if all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:])):
                # One request, or adjacent ones (the engine schedules a router's requests together): views.
                rows = slice(spans[0][0], spans[-1][1])
                h = hidden[rows] if router.needs_hidden else None
                if self.dispatch_buffers is not None:
                    router.route_into(token_ids, h, self.slots[rows], self.weights[rows])  # in place
                    continue
            else:
                rows = torch.tensor([r for start, end in spans for r in range(start, end)], device=self.device)
                h = hidden.index_select(0, rows) if router.needs_hidden else None
            self._write(rows, *router.route(token_ids, h))
        self._pending.clear()

    def _pending_cover_all(self) -> bool:
        """True where the pending routers fill every pair of the step (each row, all K choices)."""
        if any(router.top_k != self.top_k for _, _, router, _ in self._pending):
            return False
        reach = 0
        for start, end in sorted((start, end) for start, end, _, _ in self._pending):
            if start > reach:
                return False
            reach = max(reach, end)
        return reach >= self.num_tokens

    def _constant_lists(self) -> tuple[list[int], list[float]]:
        """Flat slots and weights of every pair, constant routes filled in, the rest base."""
        t, k = self.num_tokens, self.top_k
        slots, weights = [-1] * (t * k), [0.0] * (t * k)
        for start, end, route_slots, route_weights in self._constant:
            for j, (slot, weight) in enumerate(zip(route_slots, route_weights)):
                slots[start * k + j : end * k : k] = [slot] * (end - start)
                weights[start * k + j : end * k : k] = [weight] * (end - start)
        self._constant.clear()
        return slots, weights

    def _write_constant(self) -> None:
        """Every constant route of the step, built on the host and copied in once."""
        t, k = self.num_tokens, self.top_k
        slots, weights = self._constant_lists()
        self.slots.copy_(torch.tensor(slots, dtype=torch.int32).view(t, k))
        weights = torch.tensor(weights, dtype=torch.float32).view(t, k)
        if self.dispatch_buffers is None:
            self._weights_flat = weights.to(self.device).reshape(-1)  # fresh: routers may write grads
        else:
            self.weights.copy_(weights)

    def _write(self, rows: slice | torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> None:
        """Routes of `rows` (a slice or long row indices) of the step."""
        k = slots.shape[1]
        if self.dispatch_buffers is None and weights.requires_grad:
            # Out of place, so gradients reach the router through the plan's weights.
            full = self.weights.clone()
            full[rows, :k] = weights
            self._weights_flat = full.reshape(-1)
        else:
            self.weights[rows, :k] = weights
        self.slots[rows, :k] = slots.to(self.device)
