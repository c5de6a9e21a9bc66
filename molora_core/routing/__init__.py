"""Routing: specs (what a request asks for), routers bound to slots, and the per-step plan."""

from molora_core.routing.gate import GateRouter
from molora_core.routing.plan import RoutingPlan
from molora_core.routing.routers import GateSlotRouter, MixtureRouter, Router, SequenceRouter, VocabRouter
from molora_core.routing.spec import AdapterSpec, BaseSpec, GateSpec, MixtureSpec, RoutingSpec, VocabSpec

__all__ = [
    "AdapterSpec",
    "BaseSpec",
    "GateRouter",
    "GateSlotRouter",
    "GateSpec",
    "MixtureRouter",
    "MixtureSpec",
    "Router",
    "RoutingPlan",
    "RoutingSpec",
    "SequenceRouter",
    "VocabRouter",
    "VocabSpec",
]
