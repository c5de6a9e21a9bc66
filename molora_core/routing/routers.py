"""Routers bound to hot-set slots: each turns a request's tokens into per-token (slot, weight).

| router     | decides                                              | granularity |
| sequence   | one adapter for the whole request                    | sequence    |
| mixture    | named adapters with fixed weights                    | sequence    |
| vocab      | token-id ranges -> adapters (text vs image tokens)   | token       |
| gate       | learned gate over the embedding picks top-k adapters | token       |

Every router returns slots int32[n, k] (-1 = no adapter) and weights float32[n, k] for the n
tokens it is given. Routers whose `needs_hidden` is true run once the step's embeddings exist.
A task-embedding router (LORAUTER) fits the same interface: per-sequence, from the prompt.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from molora_core.errors import RouterInvalid
from molora_core.routing.gate import GateRouter


class Router:
    top_k: int = 1
    needs_hidden: bool = False
    reads_ids: bool = True  # False: `route` reads only the hidden state, and the plan passes no ids

    def route(self, token_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids long[n] (None where reads_ids is False) and hidden [n, D] (if needs_hidden) ->
        (slots int32[n, k], weights float32[n, k])."""
        raise NotImplementedError

    def route_into(self, token_ids: torch.Tensor, hidden: torch.Tensor | None, slots: torch.Tensor,
                   weights: torch.Tensor) -> None:
        """`route`, written into the first k columns of slots int32[n, K] and weights float32[n, K]
        (rows of a routing plan, K >= k); a router that can write them directly overrides this."""
        routed_slots, routed_weights = self.route(token_ids, hidden)
        k = routed_slots.shape[1]
        slots[:, :k] = routed_slots.to(slots.device)
        weights[:, :k] = routed_weights

    def constant(self) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """(slots, weights) given to every token alike, or None if they depend on the token; the
        plan writes constant routes from the host in one copy per step."""
        return None

    def batch_key(self) -> object | None:
        """Routers with equal keys route any token alike, so the plan routes all their tokens in
        one call (e.g. every request on one gate router). None: never batched."""
        return None

    @functools.cached_property
    def route_key(self) -> object | None:
        """The batch key, or a constant router's route: routers with equal keys route any token
        alike (None: no other router is known to). Made once; a router does not change."""
        return self.batch_key() or self.constant()


class SequenceRouter(Router):
    """Every token of the request to one slot with weight 1."""

    def __init__(self, slot: int):
        self.slot = slot

    def route(self, token_ids, hidden=None):
        n = token_ids.shape[0]
        slots = torch.full((n, 1), self.slot, dtype=torch.int32, device=token_ids.device)
        return slots, torch.ones(n, 1, dtype=torch.float32, device=token_ids.device)

    def constant(self):
        return (self.slot,), (1.0,)


class MixtureRouter(Router):
    """Every token to the same slots with fixed weights."""

    def __init__(self, slots: Sequence[int], weights: Sequence[float]):
        if len(slots) != len(weights) or not slots:
            raise RouterInvalid(f"a mixture needs one weight per adapter; got {len(slots)} slots and {len(weights)} weights")
        self.slots, self.weights, self.top_k = list(slots), [float(w) for w in weights], len(slots)

    def route(self, token_ids, hidden=None):
        n, device = token_ids.shape[0], token_ids.device
        slots = torch.tensor(self.slots, dtype=torch.int32, device=device).expand(n, -1)
        weights = torch.tensor(self.weights, dtype=torch.float32, device=device).expand(n, -1)
        return slots, weights

    def constant(self):
        return tuple(self.slots), tuple(self.weights)


class VocabRouter(Router):
    """Token ids in [lo, hi) to a slot; ids outside every range to `default_slot` (-1 = base)."""

    def __init__(self, ranges: Sequence[tuple[int, int, int]], default_slot: int = -1):
        ordered = sorted(ranges)
        for lo, hi, _ in ordered:
            if not 0 <= lo < hi:
                raise RouterInvalid(f"vocab range [{lo}, {hi}) is empty or negative; expected 0 <= lo < hi")
        for (lo0, hi0, _), (lo1, hi1, _) in zip(ordered, ordered[1:]):
            if lo1 < hi0:
                raise RouterInvalid(f"vocab ranges [{lo0}, {hi0}) and [{lo1}, {hi1}) overlap")
        self.ranges, self.default_slot = ordered, default_slot

    def route(self, token_ids, hidden=None):
        slots = torch.full_like(token_ids, self.default_slot, dtype=torch.int32)
        for lo, hi, slot in self.ranges:
            slots.masked_fill_((token_ids >= lo) & (token_ids < hi), slot)
        weights = (slots >= 0).float()
        return slots.unsqueeze(1), weights.unsqueeze(1)

    def batch_key(self):
        return ("vocab", tuple(self.ranges), self.default_slot)


class GateSlotRouter(Router):
    """A GateRouter whose adapters are resident at `slots` (same order as gate.adapters)."""

    needs_hidden, reads_ids = True, False

    def __init__(self, gate: GateRouter, slots: Sequence[int]):
        if len(slots) != len(gate.adapters):
            raise RouterInvalid(f"gate router has {len(gate.adapters)} adapters but {len(slots)} slots were bound")
        self.gate, self.top_k = gate, gate.top_k
        self.lookup = torch.tensor(list(slots), dtype=torch.int32)
        self._key = ("gate", id(gate), tuple(int(s) for s in slots))

    def route(self, token_ids, hidden=None):
        if hidden is None:
            raise RouterInvalid("the gate router needs the hidden state of its tokens")
        return self.gate.route_slots(hidden, self.lookup)

    def route_into(self, token_ids, hidden, slots, weights):
        if hidden is None:
            raise RouterInvalid("the gate router needs the hidden state of its tokens")
        self.gate.route_slots(hidden, self.lookup, out=(slots, weights))

    def batch_key(self):
        return self._key
