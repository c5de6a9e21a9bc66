"""`model` (+ `adapters`) of an OpenAI request -> a routing the model replica understands.

    "<base model>"            -> base, no adapter
    "<adapter>[@<version>]"   -> one adapter, every token (hot-set key "name@version")
    "molora:<router>[@<v>]"   -> the registered gate router over its adapters, per token
    "<base>" + adapters=[...] -> an explicit mixture with fixed weights

Adapters resolve to versioned hot-set keys ("math@3") when the request arrives, so a replica
never serves a request with a version other than the one resolved here, and an update makes new
requests use the new version while running ones finish on the old.

A router resolves to one key that also names its adapters' versions
("demo-gate@1:code@1,math@2"), so the replica loads a fresh gate when any of them changes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal

from adapter_store import Registry
from adapter_store.errors import InvalidName, NotFound
from deployments.errors import ApiError, bad_request, model_not_found

ROUTER_PREFIX = "molora:"
_CACHE_S = 1.0  # a deleted pinned version is seen by new requests within this delay
# ASCII digits only: str.isdigit() also accepts '²' (int() then fails) and '١' (int() reads 1).
_VERSION_RE = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Routing:
    kind: Literal["base", "adapter", "mixture", "router"]
    adapters: tuple[str, ...] = ()  # hot-set keys, in routing order
    weights: tuple[float, ...] = ()  # mixture only
    router: str | None = None  # router key, see the module docstring

    def payload(self) -> dict:
        return {"kind": self.kind, "adapters": list(self.adapters), "weights": list(self.weights), "router": self.router}


def split_version(text: str) -> tuple[str, int | None]:
    name, sep, version = text.partition("@")
    if not sep:
        return name, None
    if not _VERSION_RE.fullmatch(version) or int(version) < 1:
        raise bad_request(f"version {version!r} in {text!r} is not a positive integer", "model")
    return name, int(version)


def parse_router_key(key: str) -> tuple[str, int, list[str]]:
    """'gate@2:code@1,math@3' -> ('gate', 2, ['code@1', 'math@3'])."""
    head, _, tail = key.partition(":")
    name, _, version = head.partition("@")
    return name, int(version), [k for k in tail.split(",") if k]


@dataclass
class Resolver:
    registry: Registry
    base_model: str
    _cache: dict = field(default_factory=dict)

    def _cached(self, kind: str, name: str, version: int | None):
        """The manifest; "latest" is always read from Redis (one GET), so a new version or a
        delete is seen by the next request; a pinned version's manifest never changes and is
        kept for a moment."""
        get = self.registry.get_adapter if kind == "adapter" else self.registry.get_router
        if version is None:
            return get(name, None)
        key = (kind, name, version)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _CACHE_S:
            return hit[1]
        manifest = get(name, version)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now, manifest)
        return manifest

    def adapter_key(self, text: str, missing: ApiError) -> str:
        """The hot-set key (`name@version`) of adapter `text` (`name` or `name@N`); `missing` is
        raised when it is not registered."""
        try:
            m = self._cached("adapter", *split_version(text))
        except (NotFound, InvalidName):
            raise missing from None
        return f"{m.name}@{m.version}"

    def manifest(self, model: str) -> tuple[str, object]:
        """("base", None), ("adapter", its manifest) or ("router", its manifest) for a model id
        as GET /v1/models lists it (`@N` pins a version). Blocking (Redis reads)."""
        if model == self.base_model:
            return "base", None
        kind, text = ("router", model[len(ROUTER_PREFIX):]) if model.startswith(ROUTER_PREFIX) else ("adapter", model)
        name, version = split_version(text)
        try:
            return kind, self._cached(kind, name, version)
        except (NotFound, InvalidName):
            raise model_not_found(model, "is not served here (GET /v1/models lists the models)") from None

    def resolve(self, model: str, adapters: list | None = None) -> Routing:
        """Blocking (Redis reads): call from a thread pool."""
        if adapters:
            if model != self.base_model:
                raise bad_request(f"'adapters' (an explicit mixture) needs model={self.base_model!r}; got {model!r}",
                                  "model")
            limits = self.registry.limits
            if len(adapters) > min(limits.max_top_k, limits.hot_slots):
                raise bad_request(f"'adapters' names {len(adapters)} adapters; a mixture has at most max_top_k="
                                  f"{limits.max_top_k} (MOLORA_MAX_TOP_K), and a replica's hot-set holds hot_slots="
                                  f"{limits.hot_slots} (MOLORA_HOT_SLOTS)", "adapters")
            keys = [self.adapter_key(a.name, ApiError(404, f"adapter {a.name!r} in 'adapters' is not registered",
                                                      "not_found_error", "model_not_found", "adapters"))
                    for a in adapters]
            if len(set(keys)) != len(keys):
                raise bad_request(f"'adapters' names an adapter twice: {[a.name for a in adapters]}", "adapters")
            return Routing("mixture", tuple(keys), tuple(float(a.weight) for a in adapters))
        if model == self.base_model:
            return Routing("base")
        if model.startswith(ROUTER_PREFIX):
            name, version = split_version(model[len(ROUTER_PREFIX):])
            try:
                m = self._cached("router", name, version)
            except (NotFound, InvalidName):
                raise model_not_found(model, "names no registered router") from None
            if m.kind != "gate":
                raise ApiError(400, f"router {name!r} is of kind {m.kind!r}; only 'gate' routers serve requests",
                               code="router_kind_unsupported", param="model")
            # A router's adapter can be gone: registered before the registry refused such deletes,
            # or deleted in a race with the router's registration.
            keys = [self.adapter_key(a, ApiError(404, f"router {model!r} routes to adapter {a!r}, which is not "
                                                 "registered (it was deleted or never existed); register it again "
                                                 "or delete the router", "not_found_error", "adapter_not_found",
                                                 "model"))
                    for a in m.adapters]
            slots = self.registry.limits.hot_slots
            if len(keys) > slots:  # (registered under a larger hot-set)
                raise bad_request(f"router {model!r} routes to {len(keys)} adapters; a replica's hot-set holds "
                                  f"hot_slots={slots} (MOLORA_HOT_SLOTS)", "model")
            return Routing("router", tuple(keys), router=f"{m.name}@{m.version}:{','.join(keys)}")
        return Routing("adapter", (self.adapter_key(model, model_not_found(
            model, f"is neither the base model {self.base_model!r}, a registered adapter, nor '{ROUTER_PREFIX}<router>'"
        )),))
