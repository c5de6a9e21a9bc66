"""Faults during registration: Redis stopped mid-way, storage unreachable. Each leaves nothing
published and the store works again once the fault is gone."""

import pytest

from adapter_store.blob_cache import BlobCache
from adapter_store.errors import AdapterNotFound, RegistryUnavailable, StorageUnavailable
from adapter_store.redis_conn import EmbeddedRedis, connect
from adapter_store.registry import Registry
from adapter_store.storage import open_storage
from adapter_store.storage_local import LocalStorage

from .peft_fixtures import write_adapter
from .servers import free_port


class StopRedisAfterUpload(LocalStorage):
    """Fault injector: real local storage that stops the Redis server once the blobs are in."""

    def __init__(self, uri, server: EmbeddedRedis):
        super().__init__(uri)
        self.server = server
        self.armed = True

    def verify_blob(self, sha256, size):
        super().verify_blob(sha256, size)
        if self.armed:
            self.armed = False
            self.server.stop()


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "own-valkey").start()
    yield server
    server.stop()


def test_redis_stopped_during_registration(own_redis, tmp_path, signature, limits):
    port = own_redis.port
    url = own_redis.url
    storage = StopRedisAfterUpload((tmp_path / "storage").as_uri(), own_redis)
    client = connect(url, retries=2, backoff_base_s=0.01, backoff_cap_s=0.05, socket_timeout_s=1.0)
    reg = Registry(client, storage, BlobCache(tmp_path / "cache", 1 << 30), signature, limits=limits,
                   staging_dir=tmp_path / "staging")
    with pytest.raises(AdapterNotFound):  # Redis answers before the fault
        reg.get_adapter("none")
    with pytest.raises(RegistryUnavailable) as err:
        reg.register_adapter(write_adapter(tmp_path / "a", seed=1), "victim")
    assert err.value.status == 503
    with pytest.raises(RegistryUnavailable):
        reg.list_adapters()

    restarted = EmbeddedRedis(tmp_path / "own-valkey", port=port).start()
    try:
        assert reg.list_adapters().items == []  # no orphan manifest
        assert reg.events.read() == []
        res = reg.register_adapter(write_adapter(tmp_path / "a", seed=1), "victim")
        assert res.created and res.manifest.version == 1
        assert reg.load_adapter("victim").path.is_dir()
    finally:
        client.close()
        restarted.stop()


def test_storage_unreachable_publishes_nothing(registry, tmp_path):
    registry.storage = open_storage("s3://gone/x", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(StorageUnavailable) as err:
        registry.register_adapter(write_adapter(tmp_path / "a"), "lost")
    assert err.value.status == 503
    assert registry.list_adapters().items == [] and registry.events.read() == []
    with pytest.raises(AdapterNotFound):
        registry.get_adapter("lost")


def test_s3_backend_end_to_end(registry, s3_endpoint, s3_bucket, tmp_path):
    registry.storage = open_storage(f"s3://{s3_bucket}/adapters", endpoint_url=s3_endpoint)
    m = registry.register_adapter(write_adapter(tmp_path / "a", rank=8), "on-s3").manifest
    assert {b.sha256 for b in registry.storage.list_blobs()} == {f.sha256 for f in m.files}
    loaded = registry.load_adapter("on-s3")
    assert (loaded.path / "adapter_model.safetensors").read_bytes() == (tmp_path / "a/adapter_model.safetensors").read_bytes()
    # register by URI from files a client put in the bucket
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        registry.storage.client.upload_file(str(tmp_path / "a" / f), s3_bucket, f"adapters/incoming/x/{f}")
    res = registry.register_adapter_from_uri(f"s3://{s3_bucket}/adapters/incoming/x", "on-s3")
    assert not res.created and res.manifest.version == 1  # same content
