"""Routing specs: what a request asks for, in adapter names, before the hot-set gives slots.

The engine pins `spec.adapter_names()` in the hot-set, then `spec.bind(slot_of)` gives the
slot-bound router that fills the request's rows of the step's routing plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from molora_core.errors import RouterInvalid
from molora_core.routing.gate import GateRouter
from molora_core.routing.routers import GateSlotRouter, MixtureRouter, Router, SequenceRouter, VocabRouter


def _slot(slot_of: Mapping[str, int], name: str) -> int:
    try:
        return slot_of[name]
    except KeyError:
        raise RouterInvalid(f"adapter {name!r} has no hot-set slot bound for this request") from None


@dataclass(frozen=True)
class BaseSpec:
    """The base model, no adapter."""

    def adapter_names(self) -> list[str]:
        return []

    def bind(self, slot_of: Mapping[str, int]) -> Router | None:
        return None


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter for every token (what every other LoRA server does)."""

    adapter: str

    def adapter_names(self) -> list[str]:
        return [self.adapter]

    def bind(self, slot_of):
        return SequenceRouter(_slot(slot_of, self.adapter))


@dataclass(frozen=True)
class MixtureSpec:
    """Named adapters with fixed weights, the same for every token."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if not self.adapters or len(self.adapters) != len(self.weights):
            raise RouterInvalid(
                f"a mixture needs one weight per adapter; got {len(self.adapters)} adapters and {len(self.weights)} weights"
            )
        if len(set(self.adapters)) != len(self.adapters):
            raise RouterInvalid(f"a mixture names an adapter twice: {list(self.adapters)}")
        bad = [(a, w) for a, w in zip(self.adapters, self.weights) if not math.isfinite(w)]
        if bad:  # (a NaN weight makes every logit NaN, and every token the first id)
            raise RouterInvalid(f"a mixture's weights must be finite numbers; got {bad}")

    def adapter_names(self):
        return list(self.adapters)

    def bind(self, slot_of):
        return MixtureRouter([_slot(slot_of, a) for a in self.adapters], self.weights)


@dataclass(frozen=True)
class VocabSpec:
    """Token-id ranges [lo, hi) to adapters; other tokens to `default` (None = base model)."""

    ranges: tuple[tuple[int, int, str], ...]
    default: str | None = None

    def adapter_names(self):
        names = [name for _, _, name in self.ranges] + ([self.default] if self.default else [])
        return list(dict.fromkeys(names))

    def bind(self, slot_of):
        default = _slot(slot_of, self.default) if self.default else -1
        return VocabRouter([(lo, hi, _slot(slot_of, name)) for lo, hi, name in self.ranges], default)


@dataclass(frozen=True)
class GateSpec:
    """A learned per-token gate router over its ordered adapter set."""

    router: GateRouter

    def adapter_names(self):
        return list(self.router.adapters)

    def bind(self, slot_of):
        return GateSlotRouter(self.router, [_slot(slot_of, a) for a in self.router.adapters])


RoutingSpec = BaseSpec | AdapterSpec | MixtureSpec | VocabSpec | GateSpec
