"""deployments/config.yaml parses into AppConfig; the app builder's config helpers."""

from pathlib import Path

import yaml

from deployments.bootstrap import config_args, engine_config
from deployments.config import AppConfig

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
