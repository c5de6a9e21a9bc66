import pytest

from adapter_store.errors import ConfigError
from adapter_store.settings import StoreSettings, build_store

from .peft_fixtures import write_adapter


def test_from_env():
    s = StoreSettings.from_env({
        "MOLORA_REDIS_URL": "redis://h:1/0", "MOLORA_STORAGE_URI": "s3://b/p", "MOLORA_API_KEY": "k",
        "AWS_ENDPOINT_URL": "http://s3:9000", "MOLORA_MAX_RANK": "32", "MOLORA_CACHE_DIR": "/tmp/x",
    })
    assert s.redis_url == "redis://h:1/0" and s.storage_uri == "s3://b/p" and s.api_key.get_secret_value() == "k"
    assert s.s3_endpoint_url == "http://s3:9000" and s.max_rank == 32 and str(s.cache_root) == "/tmp/x"
    assert StoreSettings.from_env({}).redis_url is None
    with pytest.raises(ValueError, match="max_rank"):
        StoreSettings.from_env({"MOLORA_MAX_RANK": "0"})


def test_bad_storage_uri(tmp_path, signature):
    with pytest.raises(ConfigError, match="ftp"):
        build_store(StoreSettings(cache_dir=tmp_path, redis_url="redis://127.0.0.1:1", storage_uri="ftp://x"), signature)


def test_embedded_default_survives_restart(tmp_path, signature):
    settings = StoreSettings(cache_dir=tmp_path / "cache")
    store = build_store(settings, signature)
    try:
        assert store.embedded is not None
        store.registry.register_adapter(write_adapter(tmp_path / "a"), "kept", description="persist me")
    finally:
        store.close()
    store = build_store(settings, signature)
    try:
        m = store.registry.get_adapter("kept")
        assert m.version == 1 and m.description == "persist me"
        assert store.registry.load_adapter("kept").path.is_dir()
        assert (tmp_path / "cache" / "valkey").is_dir()
    finally:
        store.close()
