"""What the app builder resolves once, before any replica starts: the model directory (the demo
assets when none is given), one Redis URL for every process (an embedded Valkey when none is
given), and the demo adapters and router in the registry.

Replicas and the ingress each build their own store client from the resolved config; they never
start a Redis server themselves, so the whole app shares one registry.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

from adapter_store import BaseModelSignature, StoreSettings, build_store
from adapter_store.errors import RouterInvalid
from adapter_store.redis_conn import EmbeddedRedis
from deployments.config import AppConfig
from molora_core.engine import EngineConfig

log = logging.getLogger("molora.deployments")

DEMO_MODEL_NAME = "molora-demo"
EMBEDDED_ACTOR = "molora-embedded-valkey"
_embedded: EmbeddedRedis | None = None  # the in-process server of a driver (serve run, tests)


def demo_root(cfg: AppConfig) -> Path:
    return cfg.cache_root / "demo"


def model_dir(cfg: AppConfig) -> Path:
    if cfg.model_path is None:
        from molora_core.demo import ensure_demo_assets

        return ensure_demo_assets(demo_root(cfg)) / "model"
    return Path(cfg.model_path).expanduser().resolve()


def is_demo_model(path: Path) -> bool:
    from molora_core.demo import demo_assets_present

    return path.name == "model" and demo_assets_present(path.parent)


def base_model_name(cfg: AppConfig, path: Path) -> str:
    if cfg.model_name:
        return cfg.model_name
    return DEMO_MODEL_NAME if is_demo_model(path) else path.name


def store_settings(cfg: AppConfig) -> StoreSettings:
    return StoreSettings(
        redis_url=cfg.redis_url, storage_uri=cfg.storage_uri, cache_dir=cfg.cache_root, api_key=cfg.api_key,
        s3_endpoint_url=cfg.s3_endpoint_url, max_adapter_bytes=cfg.max_adapter_bytes, max_rank=cfg.max_rank,
        max_top_k=cfg.max_top_k, hot_slots=cfg.hot_slots, cache_max_bytes=cfg.cache_max_bytes,
    )


def open_store(cfg: AppConfig, path: Path):
    return build_store(store_settings(cfg), BaseModelSignature.from_hf_config(path, name=base_model_name(cfg, path)))


def engine_config(cfg: AppConfig) -> EngineConfig:
    device = None if cfg.device == "auto" else cfg.device
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    if dtype is None and (device == "cuda" or (device is None and _cuda())):
        dtype = "bfloat16"
    return EngineConfig(
        max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len, max_queue=max(cfg.max_queue, 1),
        hot_slots=cfg.hot_slots, max_rank=cfg.max_rank, max_top_k=cfg.max_top_k, device=device, dtype=dtype,
        prefix_caching=cfg.prefix_caching,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def config_args(cfg: AppConfig) -> dict:
    """The config as plain values for deployment arguments (the API key in clear: replicas need it)."""
    values = cfg.model_dump(mode="json")
    values["api_key"] = cfg.api_key.get_secret_value() if cfg.api_key else None
    return values


# -- one Redis for the whole app -----------------------------------------------------------
def start_embedded_valkey(cfg: AppConfig) -> str:
    """Start (once per process) the embedded Valkey of a driver process; stopped at exit."""
    global _embedded
    if _embedded is None:
        _embedded = EmbeddedRedis(cfg.cache_root / "valkey").start()
        atexit.register(stop_embedded_valkey)
        log.info("embedded Valkey at %s (data under %s)", _embedded.url, cfg.cache_root / "valkey")
    return _embedded.url


def stop_embedded_valkey() -> None:
    global _embedded
    if _embedded is not None:
        _embedded.stop()
        _embedded = None


def _valkey_actor_url(cfg: AppConfig) -> str:
    """Inside a Ray worker (a config file's build task) the process does not outlive the build,
    so the server lives in one detached, named actor that every later build finds again."""
    import ray

    @ray.remote(num_cpus=0)
    class EmbeddedValkey:
        def __init__(self, data_dir: str):
            self.server = EmbeddedRedis(data_dir).start()

        def url(self) -> str:
            return self.server.url

    actor = EmbeddedValkey.options(
        name=EMBEDDED_ACTOR, namespace="molora", lifetime="detached", get_if_exists=True
    ).remote(str(cfg.cache_root / "valkey"))
    return ray.get(actor.url.remote())


def resolve_redis_url(cfg: AppConfig) -> str:
    if cfg.redis_url:
        return cfg.redis_url
    try:
        import ray

        in_worker = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        in_worker = False
    return _valkey_actor_url(cfg) if in_worker else start_embedded_valkey(cfg)


# -- demo registration ---------------------------------------------------------------------
def register_demo_assets(store, root: Path) -> list[str]:
    """Register the demo adapters and gate router (idempotent: same content, same version)."""
    from molora_core.demo import ADAPTERS, ROUTER

    done = []
    for name in ADAPTERS:
        r = store.registry.register_adapter(root / "adapters" / name, name, description=f"demo {name} adapter",
                                            tags=["demo"])
        done.append(f"{name}@{r.manifest.version}")
    try:
        r = store.registry.register_router(root / "routers" / ROUTER, ROUTER, kind="gate", adapters=list(ADAPTERS),
                                           description="demo MoLoRA gate (top-2)", tags=["demo"])
    except RouterInvalid as e:  # (hot_slots or max_top_k set below what it needs)
        log.warning("the demo gate router is not registered: %s", e.message)
    else:
        done.append(f"molora:{ROUTER}@{r.manifest.version}")
    return done


def prepare(cfg: AppConfig) -> AppConfig:
    """Fill model_path, model_name and redis_url, and register the demo assets when serving them."""
    path = model_dir(cfg)
    cfg = cfg.model_copy(update={"model_path": str(path), "model_name": base_model_name(cfg, path),
                                 "redis_url": resolve_redis_url(cfg)})
    if cfg.register_demo_assets and is_demo_model(path):
        store = open_store(cfg, path)
        try:
            log.info("registered demo assets: %s", register_demo_assets(store, path.parent))
        finally:
            store.close()
    return cfg
