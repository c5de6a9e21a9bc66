"""Store settings and the one-call factory the deployment uses.

    settings = StoreSettings.from_env()                       # MOLORA_* environment
    store = build_store(settings, BaseModelSignature.from_hf_config(model_dir))
    app.include_router(build_registry_router(store.registry, api_key=settings.api_key))
    ...
    store.close()

With no ``redis_url`` an embedded Valkey server starts with its data (AOF on) under
``<cache_dir>/valkey``; with no ``storage_uri`` blobs live under ``<cache_dir>/storage``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

from .base_model import BaseModelSignature
from .blob_cache import BlobCache
from .redis_conn import EmbeddedRedis, connect
from .registry import Registry, StoreLimits
from .storage import open_storage

_ENV = {
    "redis_url": "MOLORA_REDIS_URL",
    "storage_uri": "MOLORA_STORAGE_URI",
    "cache_dir": "MOLORA_CACHE_DIR",
    "api_key": "MOLORA_API_KEY",
    "s3_endpoint_url": "MOLORA_S3_ENDPOINT_URL",
    "max_adapter_bytes": "MOLORA_MAX_ADAPTER_BYTES",
    "max_rank": "MOLORA_MAX_RANK",
    "max_top_k": "MOLORA_MAX_TOP_K",
    "hot_slots": "MOLORA_HOT_SLOTS",
    "cache_max_bytes": "MOLORA_CACHE_MAX_BYTES",
}


class StoreSettings(BaseModel):
    redis_url: str | None = Field(None, description="redis:// or rediss:// URL; None starts an embedded Valkey.")
    storage_uri: str | None = Field(None, description="file:///path or s3://bucket/prefix; None = <cache_dir>/storage.")
    cache_dir: Path = Field(Path("~/.cache/molora"), description="Disk cache, staging and embedded data.")
    api_key: SecretStr | None = Field(None, description="Bearer token required for registry mutations.")
    s3_endpoint_url: str | None = Field(None, description="Endpoint of an S3-compatible store (else AWS_ENDPOINT_URL / AWS).")
    max_adapter_bytes: int = Field(512 << 20, gt=0, description="Cap on an artifact's total bytes (uploads too).")
    max_rank: int = Field(64, gt=0, le=1024, description="Largest LoRA rank accepted (the hot-set's R; the app's cap).")
    max_top_k: int = Field(4, ge=1, le=16, description="Largest gate router top-k accepted (the replicas' max_top_k).")
    hot_slots: int = Field(8, ge=1, le=4096, description="Most adapters a router may name (a replica's hot-set).")
    cache_max_bytes: int = Field(8 << 30, gt=0, description="Size cap of the local disk cache (LRU).")
    namespace: str = Field("molora", pattern=r"^[a-z0-9_-]{1,32}$", description="Prefix of every Redis key.")
    redis_retries: int = Field(3, ge=0, le=20, description="Retries of a transient Redis error.")
    redis_max_connections: int = Field(64, ge=1, le=10_000, description="Connection pool size.")
    replica_ttl_s: float = Field(15.0, gt=0, description="A replica without a heartbeat for this long is gone.")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "StoreSettings":
        env = os.environ if env is None else env
        values = {field: env[var] for field, var in _ENV.items() if env.get(var)}
        if "s3_endpoint_url" not in values and env.get("AWS_ENDPOINT_URL"):
            values["s3_endpoint_url"] = env["AWS_ENDPOINT_URL"]
        values.update(overrides)
        return cls(**values)

    @property
    def cache_root(self) -> Path:
        return self.cache_dir.expanduser()


@dataclass
class AdapterStore:
    """Everything the deployment needs, built by ``build_store``; ``close`` when done."""

    settings: StoreSettings
    registry: Registry
    embedded: EmbeddedRedis | None

    def close(self) -> None:
        self.registry.collector.stop()
        self.registry.client.close()
        self.registry.client.connection_pool.disconnect()
        if self.embedded is not None:
            self.embedded.stop()


def build_store(settings: StoreSettings, base_model: BaseModelSignature) -> AdapterStore:
    root = settings.cache_root
    root.mkdir(parents=True, exist_ok=True)
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(root / "valkey").start()
        url = embedded.url
    try:
        client = connect(url, max_connections=settings.redis_max_connections, retries=settings.redis_retries)
        storage = open_storage(
            settings.storage_uri or (root / "storage").resolve().as_uri(), endpoint_url=settings.s3_endpoint_url
        )
        registry = Registry(
            client, storage, BlobCache(root / "blobs", settings.cache_max_bytes), base_model,
            limits=StoreLimits(settings.max_adapter_bytes, settings.max_rank, settings.max_top_k,
                               settings.hot_slots),
            staging_dir=root / "staging", namespace=settings.namespace, replica_ttl_s=settings.replica_ttl_s,
        )
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    return AdapterStore(settings, registry, embedded)
