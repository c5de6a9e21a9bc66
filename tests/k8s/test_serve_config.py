"""serveConfigV2 is a valid Ray Serve config for this project's app, and agrees with AppConfig."""

from __future__ import annotations

import ast
import typing

import pydantic
import pytest
from ray.serve.schema import ServeDeploySchema

from deployments.config import ENV_VARS, AppConfig
from tests.k8s.manifests import BUILDS, OVERLAYS, REPO, app_of, by_kind, configmaps_of, container_env, deployment_options, \
    ray_groups, render, serve_config

DEPLOYMENTS = {"Ingress", "ModelReplica"}


def _rayservice(build: str) -> dict:
    [svc] = by_kind(render(build), "RayService")
    return svc


def _unknown_keys(model: type[pydantic.BaseModel], data: typing.Any, where: str = "") -> list[str]:
    """Keys the pydantic model does not declare, recursively. Ray Serve's schemas ignore unknown
    keys, so a misspelt option (`autoscalling_config`) would pass their validation silently."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    found = [f"{where}/{k}" for k in data if k not in names]
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                found += _unknown_keys(sub, item, f"{where}/{key}" + (f"/{i}" if isinstance(value, list) else ""))
    return found


def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _app_config(build: str) -> tuple[AppConfig, dict, dict]:
    """AppConfig as the app builder sees it on the head: serveConfigV2 args + the head's env."""
    objects = render(build)
    svc = _rayservice(build)
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = container_env(head, configmaps_of(objects))
    args = app_of(svc).get("args", {})
    return AppConfig.from_sources(args, env), args, env


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_serve_config_validates_against_ray_serve_schema(build):
    config = serve_config(_rayservice(build))
    ServeDeploySchema.model_validate(config)
    assert _unknown_keys(ServeDeploySchema, config) == []


def test_unknown_serve_keys_are_caught():
    config = serve_config(_rayservice("prod-gpu"))
    config["applications"][0]["deployments"][1]["autoscalling_config"] = {}
    ServeDeploySchema.model_validate(config)  # Ray's own schema lets it through ...
    assert _unknown_keys(ServeDeploySchema, config) == ["/applications/0/deployments/1/autoscalling_config"]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_app_is_this_projects_app(build):
    config = serve_config(_rayservice(build))
    app = app_of(_rayservice(build))
    assert app["import_path"] == "deployments.app:app"
    assert app["route_prefix"] == "/"
    assert set(deployment_options(_rayservice(build))) == DEPLOYMENTS
    # Inside a Pod the proxy must listen on every interface, on the port KubeRay's serve Service targets.
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_deployment_names_exist_in_the_app():
    """Serve refuses a config that names a deployment the application does not have."""
    path = REPO / "deployments" / "app.py"
    if not path.is_file():
        pytest.skip("deployments/app.py is not written yet")
    names = {
        kw.value.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "name" and isinstance(kw.value, ast.Constant)
    }
    assert DEPLOYMENTS <= names, f"deployments/app.py names {sorted(names)}"


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_args_are_app_config_fields_and_validate(build):
    cfg, args, env = _app_config(build)
    assert set(args) <= set(AppConfig.model_fields), f"unknown args {set(args) - set(AppConfig.model_fields)}"
    # One place per setting: a field set both in args and in the environment is ambiguous to a reader
    # (args win) and the two copies drift apart.
    both = {field for field in args if env.get(ENV_VARS[field], "") != ""}
    assert both == set()
    assert cfg.redis_url and cfg.storage_uri and cfg.storage_uri.startswith("s3://")
    assert cfg.cache_dir == "/var/cache/molora"


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_deployment_options_agree_with_app_config(build):
    """deployments/app.py derives ModelReplica's options from AppConfig; the serve config's overrides
    must say the same, or the cluster runs something other than what the config reads."""
    cfg, args, _ = _app_config(build)
    replica = deployment_options(_rayservice(build))["ModelReplica"]
    assert "num_replicas" not in args and "num_replicas" not in replica, "autoscaling, not a fixed count"
    autoscaling = replica["autoscaling_config"]
    assert {k: autoscaling[k] for k in cfg.autoscaling_config()} == cfg.autoscaling_config()
    assert replica["ray_actor_options"] == {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica}
    ingress = deployment_options(_rayservice(build))["Ingress"]
    a = ingress["autoscaling_config"]
    assert 1 <= a["min_replicas"] <= a["max_replicas"]


def test_gpu_overlay_runs_replicas_on_gpus():
    cfg, _, _ = _app_config("prod-gpu")
    assert cfg.device == "cuda" and cfg.num_gpus_per_replica == 1 and cfg.dtype == "bfloat16"
    assert cfg.model_path and cfg.model_path.startswith("/models/")
    assert deployment_options(_rayservice("prod-gpu"))["ModelReplica"]["ray_actor_options"]["num_gpus"] == 1


def test_cpu_overlay_has_no_gpu_anywhere():
    cfg, _, _ = _app_config("dev-cpu")
    assert cfg.device == "cpu" and cfg.num_gpus_per_replica == 0 and cfg.dtype == "float32"
    assert "nvidia.com/gpu" not in str(render("dev-cpu"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_demo_model_only_on_a_single_ray_node(overlay):
    """Without a model path the app builder makes the demo model on its own node's disk and passes
    that path to every replica, so a cluster serving it must be one Ray node."""
    cfg, _, _ = _app_config(overlay)
    groups = [name for name, _ in ray_groups(_rayservice(overlay))]
    if cfg.model_path is None:
        assert groups == ["head"], f"demo model with worker groups {groups[1:]}"
