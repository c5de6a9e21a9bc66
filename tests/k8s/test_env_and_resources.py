"""Environment variables are ones the app reads; resources fit real nodes and the Serve replicas."""

from __future__ import annotations

from decimal import Decimal

import pytest

from deployments.config import ENV_VARS
from tests.k8s.manifests import ALLOWED_NON_MOLORA, BUILDS, K8S, OVERLAYS, by_kind, configmaps_of, containers, \
    deployment_options, env_sources, pod_specs, quantity, ray_groups, render

ALLOWED_ENV = frozenset(ENV_VARS.values()) | ALLOWED_NON_MOLORA

# A 1-GPU node the GPU worker must fit on, after the kubelet's reservations and a margin for
# DaemonSets (AWS g5.4xlarge / g6.4xlarge and GCP g2-standard-16 have 16 vCPU and 64 GiB).
GPU_NODE_ALLOCATABLE = {"cpu": Decimal("14"), "memory": quantity("56Gi"), "nvidia.com/gpu": Decimal(1)}


def _all_env(build: str) -> dict[str, dict[str, str]]:
    objects = render(build)
    cms = configmaps_of(objects)
    return {f"{where}/{c['name']}": env_sources(c, cms)
            for obj in objects for where, spec in pod_specs(obj) for c in containers(spec)}


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_env_var_is_one_the_config_reads(build):
    bad = {f"{where}: {name}" for where, env in _all_env(build).items() for name in env if name not in ALLOWED_ENV}
    assert bad == set()


def test_env_check_catches_a_misspelt_variable():
    container = {"name": "c", "env": [{"name": "MOLORA_MODLE_PATH", "value": "/m"}],
                 "envFrom": [{"configMapRef": {"name": "cm"}}]}
    names = set(env_sources(container, {"cm": {"data": {"MOLORA_DTYPE": "auto", "HF_HOME": "/x"}}}))
    assert names - ALLOWED_ENV == {"MOLORA_MODLE_PATH", "HF_HOME"}
    with pytest.raises(AssertionError):
        env_sources({"name": "c", "envFrom": [{"secretRef": {"name": "s"}}]}, {})


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_configmap_values_are_strings(build):
    for cm in by_kind(render(build), "ConfigMap"):
        assert all(isinstance(v, str) for v in cm.get("data", {}).values()), cm["metadata"]["name"]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_ray_node_sees_the_same_app_env(build):
    """The app builder, the ingress and the replicas may run on any Ray node: same config everywhere."""
    [svc] = by_kind(render(build), "RayService")
    cms = configmaps_of(render(build))
    seen = {name: env_sources(group["template"]["spec"]["containers"][0], cms) for name, group in ray_groups(svc)}
    first = next(iter(seen.values()))
    assert all(env == first for env in seen.values()), seen
    assert first["MOLORA_REDIS_URL"] == "secret:molora-redis/url"
    assert first["MOLORA_API_KEY"].startswith("secret:")
    assert first["AWS_SECRET_ACCESS_KEY"].startswith("secret:") and first["AWS_ACCESS_KEY_ID"].startswith("secret:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readme_creates_every_referenced_secret_key(overlay):
    readme = (K8S.parent / "README.md").read_text()
    refs = set()
    for obj in render(overlay):
        for _, spec in pod_specs(obj):
            for c in containers(spec):
                refs |= {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                         for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
            refs |= {(v["secret"]["secretName"], item["key"])
                     for v in spec.get("volumes", []) if "secret" in v for item in v["secret"].get("items", [])}
    refs |= {(o["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"],
              o["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["key"])
             for o in by_kind(render(overlay), "RayService") if "gcsFaultToleranceOptions" in o["spec"]["rayClusterConfig"]}
    for name, key in refs:
        assert f"kubectl create secret generic {name}" in readme, name
        assert f"--from-literal={key}=" in readme, f"{name}/{key}"


def _capacity(group: dict) -> dict[str, Decimal]:
    """What Ray advertises for a group's Pod: rayStartParams override the container limits."""
    container = group["template"]["spec"]["containers"][0]
    limits = {k: quantity(v) for k, v in container["resources"]["limits"].items()}
    params = group.get("rayStartParams", {})
    return {"CPU": Decimal(params["num-cpus"]) if "num-cpus" in params else limits["cpu"],
            "GPU": Decimal(params["num-gpus"]) if "num-gpus" in params else limits.get("nvidia.com/gpu", Decimal(0))}


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_ray_containers_have_guaranteed_resources(build):
    [svc] = by_kind(render(build), "RayService")
    for name, group in ray_groups(svc):
        for c in group["template"]["spec"]["containers"]:
            res = c["resources"]
            assert set(res["requests"]) == set(res["limits"]) >= {"cpu", "memory"}, name
            assert {k: quantity(v) for k, v in res["requests"].items()} == {k: quantity(v) for k, v in res["limits"].items()}
            shm = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm"][0]["emptyDir"]
            assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) < quantity(res["limits"]["memory"]) / 2


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_serve_replicas_fit_the_cluster(build):
    """Each replica fits on one Pod, and every deployment at max_replicas fits the cluster at its
    largest, so Serve's autoscaler never asks for more than Ray's autoscaler can give."""
    [svc] = by_kind(render(build), "RayService")
    cluster = svc["spec"]["rayClusterConfig"]
    groups = list(ray_groups(svc))
    capacity = {"CPU": Decimal(0), "GPU": Decimal(0)}
    for name, group in groups:
        count = 1 if name == "head" else group["maxReplicas"]
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for k, v in _capacity(group).items():
            capacity[k] += count * v
    demand = {"CPU": Decimal(0), "GPU": Decimal(0)}
    for dep in deployment_options(svc).values():
        actor = dep["ray_actor_options"]
        need = {"CPU": Decimal(str(actor.get("num_cpus", 1))), "GPU": Decimal(str(actor.get("num_gpus", 0)))}
        assert any(all(_capacity(g)[k] >= need[k] for k in need) for _, g in groups), f"{dep['name']} fits no Pod"
        for k in need:
            demand[k] += dep["autoscaling_config"]["max_replicas"] * need[k]
    assert all(demand[k] <= capacity[k] for k in demand), (demand, capacity)
    if len(groups) > 1:
        assert cluster["enableInTreeAutoscaling"] is True


def test_gpu_workers_fit_a_real_gpu_node():
    [svc] = by_kind(render("prod-gpu"), "RayService")
    [(name, group)] = [(n, g) for n, g in ray_groups(svc) if n != "head"]
    assert name == "gpu-workers"
    spec = group["template"]["spec"]
    limits = {k: quantity(v) for k, v in spec["containers"][0]["resources"]["limits"].items()}
    assert limits["nvidia.com/gpu"] == 1
    assert all(limits[k] <= GPU_NODE_ALLOCATABLE[k] for k in GPU_NODE_ALLOCATABLE), limits
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no replicas on the head in production"
    assert "nvidia.com/gpu" not in str(head)


def test_prod_has_gcs_fault_tolerance_on_the_registry_redis():
    objects = render("prod-gpu")
    [svc] = by_kind(objects, "RayService")
    ft = svc["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    [redis_svc] = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "molora-redis"]
    host, port = ft["redisAddress"].split(":")
    assert host == redis_svc["metadata"]["name"] and int(port) == redis_svc["spec"]["ports"][0]["port"]
    [sts] = by_kind(objects, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "--appendonly yes" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]


@pytest.mark.parametrize("build", sorted(OVERLAYS))
def test_the_redis_fails_writes_before_its_memory_limit(build):
    """noeviction only applies under a maxmemory (Redis's default: none, so the container is
    OOM-killed at its limit instead); it leaves room for the AOF rewrite's fork."""
    [sts] = by_kind(render(build), "StatefulSet")
    [redis] = sts["spec"]["template"]["spec"]["containers"]
    args = redis["args"][0].split()
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    value = args[args.index("--maxmemory") + 1]
    assert value.endswith("mb")
    limit = quantity(redis["resources"]["limits"]["memory"])
    assert Decimal(value[:-2]) * 2**20 <= limit * Decimal("0.75")
