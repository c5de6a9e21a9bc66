"""The routing plan of one step: slots[T, K] and weights[T, K] for every token of the batch.

Requests fill their rows through their routers; routers that read the hidden state (the gate)
are resolved once the step's embeddings exist. `finalize` then builds the dispatch metadata
once, into buffers allocated at start-up, and every MoLoRA layer of the step shares it.
"""

from __future__ import annotations

import torch

from kernels import DispatchBuffers, DispatchMeta, build_dispatch
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
        self._slots_flat = torch.full((max_tokens * max_k,), -1, dtype=torch.int32, device=self.device)
        self._weights_flat = torch.zeros(max_tokens * max_k, dtype=torch.float32, device=self.device)
        self.num_tokens, self.top_k = 0, 1
        self._pending: list[tuple[int, int, Router, torch.Tensor]] = []

    def begin(self, num_tokens: int, top_k: int) -> None:
        """Start a step of `num_tokens` tokens with `top_k` choices; every row starts as base (-1)."""
        if not 0 < num_tokens <= self.max_tokens or not 0 < top_k <= self.max_k:
            raise ValueError(
                f"step of T={num_tokens}, K={top_k} does not fit a plan of T<={self.max_tokens}, K<={self.max_k}"
            )
        self.num_tokens, self.top_k = num_tokens, top_k
        n = num_tokens * top_k
        if self.dispatch_buffers is None:
            self._slots_flat = torch.full((n,), -1, dtype=torch.int32, device=self.device)
            self._weights_flat = torch.zeros(n, dtype=torch.float32, device=self.device)
        else:
            self._slots_flat[:n].fill_(-1)
            self._weights_flat[:n].zero_()
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
        if router.needs_hidden:
            self._pending.append((start, end, router, token_ids))
            return
        self._write(start, end, *router.route(token_ids.to(self.device)))

    @property
    def needs_hidden(self) -> bool:
        return bool(self._pending)

    def finalize(self, hidden: torch.Tensor | None = None) -> DispatchMeta:
        """Resolve routers that read `hidden` [T, D] (the step's embeddings), then build dispatch metadata."""
        if self._pending:
            if hidden is None:
                raise ValueError("the plan has gate-routed tokens; finalize needs the step's hidden state")
            for start, end, router, token_ids in self._pending:
                self._write(start, end, *router.route(token_ids, hidden[start:end]))
            self._pending.clear()
        if self.dispatch_buffers is None:
            return build_dispatch(self.slots, self.weights, self.num_slots)
        return self.dispatch_buffers.build(self.slots, self.weights)

    def _write(self, start: int, end: int, slots: torch.Tensor, weights: torch.Tensor) -> None:
        k = slots.shape[1]
        if self.dispatch_buffers is None and weights.requires_grad:
            # Out of place, so gradients reach the router through the plan's weights.
            full = self.weights.clone()
            full[start:end, :k] = weights
            self._weights_flat = full.reshape(-1)
        else:
            self.weights[start:end, :k] = weights
        self.slots[start:end, :k] = slots.to(self.device)
