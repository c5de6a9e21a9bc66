"""One real Ray Serve app for the whole session: embedded Valkey, local storage, the demo model
(built once into a temporary directory) with its adapters and router, two model replicas."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

APP = "molora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    base_url: str
    cfg: object
    demo: Path
    registry: object

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kw)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from molora_core.demo import ensure_demo_assets

    # The same place as tests/molora_core's fixtures: one build per session.
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


# Package scope: Ray and its replicas stop once the deployments tests are done, instead of
# competing for the CPU with the rest of the session.
@pytest.fixture(scope="package")
def served(demo_dir, tmp_path_factory):
    import ray
    from ray import serve

    from adapter_store.redis_conn import EmbeddedRedis
    from deployments.app import build_app
    from deployments.bootstrap import open_store, prepare
    from deployments.config import AppConfig

    root = tmp_path_factory.mktemp("serve")
    valkey = EmbeddedRedis(root / "valkey").start()
    ray.init(num_cpus=4, include_dashboard=False, namespace="molora-test", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = prepare(AppConfig.from_sources({
        "model_path": str(demo_dir / "model"), "redis_url": valkey.url, "cache_dir": str(root / "cache"),
        "num_replicas": 2, "num_cpus_per_replica": 1, "max_batch": 8, "max_seq_len": 256, "max_queue": 64,
        "hot_slots": 6, "max_rank": 16,
    }, env={}))
    serve.run(build_app(cfg, heartbeat_s=0.5, placement_interval_s=1.0, routing_stats_period_s=0.5),
              name=APP, route_prefix="/")
    store = open_store(cfg, demo_dir / "model")
    try:
        yield Served(f"http://127.0.0.1:{port}", cfg, demo_dir, store.registry)
    finally:
        store.close()
        serve.shutdown()
        ray.shutdown()
        valkey.stop()
