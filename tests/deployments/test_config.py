"""deployments/config.yaml parses into AppConfig; the app builder's config helpers."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.bootstrap import config_args, engine_config
from deployments.config import AppConfig
from deployments.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_config_yaml_parses_into_app_config():
    doc = yaml.safe_load((ROOT / "deployments" / "config.yaml").read_text())
    (application,) = doc["applications"]
    assert application["import_path"] == "deployments.app:app"
    cfg = AppConfig.from_sources(application["args"], env={})
    assert cfg.hot_slots == 8 and cfg.num_replicas == 1 and cfg.model_path is None
    # The environment fills only what the file leaves unset.
    cfg = AppConfig.from_sources(application["args"], env={"MOLORA_REDIS_URL": "redis://r:6379/0", "MOLORA_HOT_SLOTS": "2"})
    assert cfg.redis_url == "redis://r:6379/0" and cfg.hot_slots == 8


def test_serve_schema_accepts_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deployments" / "config.yaml").read_text()))


def test_engine_config_and_args_round_trip():
    cfg = AppConfig.from_sources({"device": "cpu", "hot_slots": 3, "max_rank": 16, "api_key": "k"}, env={})
    ec = engine_config(cfg)
    assert (ec.device, ec.dtype, ec.hot_slots, ec.max_rank) == ("cpu", None, 3, 16)
    args = config_args(cfg)
    assert args["api_key"] == "k"
    assert AppConfig.model_validate(args).api_key.get_secret_value() == "k"


def test_blank_values_are_unset_and_values_lose_surrounding_whitespace():
    """In `args` as in the environment: `model_path: ""` is the demo model, not the current
    directory; an API key from a file keeps no final newline."""
    args = {"model_path": "", "cache_dir": " ", "s3_endpoint_url": "", "api_key": "s3cret\n", "hot_slots": "2 "}
    cfg = AppConfig.from_sources(args, env={"MOLORA_STORAGE_URI": ""})
    assert (cfg.model_path, cfg.cache_dir, cfg.s3_endpoint_url, cfg.storage_uri) == (None, "~/.cache/molora", None, None)
    assert cfg.api_key.get_secret_value() == "s3cret" and cfg.hot_slots == 2


@pytest.mark.parametrize("field, value", [
    ("storage_uri", "/data/adapters"), ("storage_uri", "gs://bucket/x"), ("storage_uri", "s3://"),
    ("storage_uri", "s3:///prefix"), ("storage_uri", "file://host/x"), ("storage_uri", "file:///a#b"),
    ("redis_url", "localhost:6379"), ("redis_url", "http://redis:6379"), ("redis_url", "redis://"),
    ("s3_endpoint_url", "minio:9000"), ("s3_endpoint_url", "not a url"),
])
def test_a_uri_the_app_cannot_use_is_refused_before_anything_starts(field, value):
    with pytest.raises(ValidationError, match=field):
        AppConfig.from_sources({field: value}, env={})


@pytest.mark.parametrize("device, gpus", [("cpu", 1), ("cuda", 0)])
def test_a_device_without_its_gpu_share_is_refused(device, gpus):
    """device 'cuda' needs GPUs reserved for its replicas (Ray shows an actor only its own), and
    'cpu' reserves none."""
    with pytest.raises(ValidationError, match=f"device '{device}' with num_gpus_per_replica="):
        AppConfig.from_sources({"device": device, "num_gpus_per_replica": gpus}, env={})
    assert AppConfig.from_sources({"device": device, "num_gpus_per_replica": 1 - gpus}, env={}).device == device


def test_the_app_and_the_store_refuse_the_same_max_rank():
    """MOLORA_MAX_RANK sizes the replicas' hot-set and the registry's rank check alike."""
    from adapter_store.settings import StoreSettings

    for settings in (AppConfig, StoreSettings):
        assert settings.model_validate({"max_rank": 1024}).max_rank == 1024
        with pytest.raises(ValidationError, match="max_rank"):
            settings.model_validate({"max_rank": 1025})


def test_good_uris_pass():
    cfg = AppConfig.from_sources({"storage_uri": "s3://b/p#1", "redis_url": "rediss://:pw@r:6380/1",
                                  "s3_endpoint_url": "http://minio:9000"}, env={"MOLORA_STORAGE_URI": "file:///x"})
    assert (cfg.storage_uri, cfg.redis_url) == ("s3://b/p#1", "rediss://:pw@r:6380/1")
    assert AppConfig.from_sources({}, env={"MOLORA_REDIS_URL": "unix:///run/redis.sock"}).redis_url


@pytest.mark.parametrize("value", ["abc", "70000", "-1", "0"])
def test_a_bad_http_port_is_a_usage_error(value, monkeypatch, capsys):
    monkeypatch.setenv("MOLORA_HTTP_PORT", value)
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "MOLORA_HTTP_PORT" in capsys.readouterr().err


def test_a_demo_router_the_config_cannot_serve_is_skipped_with_a_warning(tmp_path, caplog):
    """With hot_slots (or max_top_k) below what the demo gate needs, the registry refuses it:
    the app still starts, with the demo adapters, and says why the router is missing."""
    from types import SimpleNamespace

    from adapter_store.errors import RouterInvalid
    from deployments.bootstrap import register_demo_assets

    def refuse(*args, **kwargs):
        raise RouterInvalid("a router over 4 adapters can never be served: ... hot_slots=2", param="adapters")

    registered = SimpleNamespace(manifest=SimpleNamespace(version=1))
    registry = SimpleNamespace(register_adapter=lambda *a, **k: registered, register_router=refuse)
    store = SimpleNamespace(registry=registry)
    with caplog.at_level("WARNING", logger="molora.deployments"):
        done = register_demo_assets(store, tmp_path)
    assert done == ["code@1", "math@1", "chat@1", "multilingual@1"]
    assert "demo gate router is not registered" in caplog.text and "hot_slots=2" in caplog.text
