"""Adapters as artifacts: PEFT validation, manifests, object storage, the Redis registry,
placement and the registry's HTTP routes. Never imports molora_core or kernels.

Entry points for the deployment: ``StoreSettings.from_env`` + ``build_store`` (one call builds
Redis, storage, cache and the Registry), ``build_registry_router`` (the HTTP API), and on the
registry: ``load_adapter`` (cold load), ``events`` (follow changes), ``replicas`` (heartbeats,
demand, placement).
"""

from .base_model import BaseModelSignature
from .errors import (
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    IntegrityError,
    RegistryUnavailable,
    RouterNotFound,
    StorageUnavailable,
    StoreError,
)
from .events import Event, EventLog
from .manifest import AdapterManifest, RouterManifest
from .placement import ReplicaCapacity, plan_placement
from .registry import LoadedArtifact, Page, RegisterResult, Registry, StoreLimits
from .replicas import ReplicaDirectory, ReplicaHeartbeat, ReplicaState, UsageCounter
from .routes import build_registry_router
from .settings import AdapterStore, StoreSettings, build_store

__all__ = [
    "AdapterInvalid", "AdapterManifest", "AdapterNotFound", "AdapterStore", "AdapterTooLarge",
    "BaseModelSignature", "Event", "EventLog", "IntegrityError", "LoadedArtifact", "Page",
    "RegisterResult", "Registry", "RegistryUnavailable", "ReplicaCapacity", "ReplicaDirectory",
    "ReplicaHeartbeat", "ReplicaState", "RouterManifest", "RouterNotFound", "StorageUnavailable",
    "StoreError", "StoreLimits", "StoreSettings", "UsageCounter", "build_registry_router",
    "build_store", "plan_placement",
]
