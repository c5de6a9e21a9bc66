"""Helpers shared by the k8s/ tests: render the builds, walk pod templates, read env and resources."""

from __future__ import annotations

import functools
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import yaml

from tests.k8s import kustomize

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BUILDS = {"base": K8S / "base", "dev-cpu": K8S / "overlays" / "dev-cpu", "prod-gpu": K8S / "overlays" / "prod-gpu"}
OVERLAYS = ("dev-cpu", "prod-gpu")

# Environment variables a manifest may set besides deployments.config.ENV_VARS: the standard AWS
# credential chain that boto3 reads for S3 (adapter_store.storage_s3). boto3's session reads the
# region from AWS_DEFAULT_REGION (AWS_REGION is not read by Session.region_name), so that is the
# one the ConfigMap sets; AWS_REGION is allowed because other AWS SDKs read it.
ALLOWED_NON_MOLORA = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"})

# Placeholder values for variables that come from Secrets (their values are never in the manifests).
SECRET_PLACEHOLDERS = {
    "MOLORA_REDIS_URL": "redis://:placeholder@molora-redis:6379/0",
    "MOLORA_API_KEY": "placeholder-api-key",
    "AWS_ACCESS_KEY_ID": "placeholder",
    "AWS_SECRET_ACCESS_KEY": "placeholder",
}


@functools.lru_cache(maxsize=None)
def _render(name: str) -> tuple[str, ...]:
    # Cached as YAML text so every caller gets fresh, unshared objects.
    return tuple(yaml.safe_dump(o) for o in kustomize.build(BUILDS[name]))


def render(name: str) -> list[dict]:
    return [yaml.safe_load(text) for text in _render(name)]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_config(rayservice: dict) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def app_of(rayservice: dict) -> dict:
    apps = serve_config(rayservice)["applications"]
    assert len(apps) == 1, f"expected one Serve application, found {len(apps)}"
    return apps[0]


def deployment_options(rayservice: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app_of(rayservice).get("deployments", [])}


def ray_groups(rayservice: dict) -> Iterator[tuple[str, dict]]:
    """('head', headGroupSpec) then (groupName, workerGroupSpec) for each worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec inside an object, wherever it sits (Deployment, StatefulSet, RayService, ...)."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, dict]]:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                yield where, node
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{where}/{i}")

    yield from walk(obj, f"{obj['kind']}/{obj['metadata']['name']}")


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def env_sources(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """Variable name -> where its value comes from ('value', 'configmap:<name>', 'secret:<name>/<key>').

    envFrom counts: every key of a referenced ConfigMap becomes a variable (with the prefix). An
    envFrom of a Secret is refused: its keys are not in the manifests, so they cannot be checked."""
    found: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names ConfigMap {name!r}, which the build does not contain"
            for key in configmaps[name].get("data", {}):
                found[prefix + key] = f"configmap:{name}"
        else:
            raise AssertionError(f"envFrom {source!r}: only ConfigMaps (whose keys are checked) are allowed")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            found[var["name"]] = f"secret:{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}"
        elif "configMapKeyRef" in ref:
            name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            assert key in configmaps.get(name, {}).get("data", {}), f"{var['name']}: no key {key!r} in ConfigMap {name!r}"
            found[var["name"]] = f"configmap:{name}/{key}"
        elif "value" in var:
            found[var["name"]] = "value"
        else:
            found[var["name"]] = "other"
    return found


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """Variable name -> value as the process sees it; Secret values are placeholders."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = configmaps[source["configMapRef"]["name"]].get("data", {})
            values.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "value" in var:
            values[var["name"]] = var["value"]
        elif "configMapKeyRef" in ref:
            values[var["name"]] = configmaps[ref["configMapKeyRef"]["name"]]["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            values[var["name"]] = SECRET_PLACEHOLDERS[var["name"]]
    return values


def configmaps_of(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def quantity(value: int | float | str) -> Decimal:
    """A Kubernetes resource quantity ('500m', '48Gi', 2) as a number of base units."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?", str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return Decimal(match.group(1)) * Decimal(_SUFFIX[match.group(2) or ""])
