"""Every RayService and RayCluster in every build validates against the vendored KubeRay CRDs."""

from __future__ import annotations

import copy
import re

import pytest

from tests.k8s import openapi
from tests.k8s.manifests import BUILDS, REPO, by_kind, render

SCHEMAS = openapi.schema_dir(REPO)
CRDS = {"RayService": SCHEMAS / "ray.io_rayservices.yaml", "RayCluster": SCHEMAS / "ray.io_rayclusters.yaml"}

pytestmark = pytest.mark.skipif(
    not all(p.is_file() for p in CRDS.values()),
    reason=f"KubeRay CRD schemas not found at {SCHEMAS} (CI keeps shared/ beside the clone as ../shared)",
)


def _validator(kind: str):
    return openapi.crd_validator(str(CRDS[kind]), "v1")


def _ray_objects(build: str) -> list[dict]:
    """The build's RayServices and RayClusters, plus each RayService's cluster spec as a RayCluster."""
    objects = render(build)
    found = by_kind(objects, "RayService") + by_kind(objects, "RayCluster")
    for svc in by_kind(objects, "RayService"):
        found.append({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                      "metadata": {"name": svc["metadata"]["name"]}, "spec": svc["spec"]["rayClusterConfig"]})
    return found


def test_crds_are_the_documented_ones():
    assert openapi.crd_identity(str(CRDS["RayService"]))[:2] == ("ray.io", "RayService")
    assert openapi.crd_identity(str(CRDS["RayCluster"]))[:2] == ("ray.io", "RayCluster")
    assert "v1" in openapi.crd_identity(str(CRDS["RayService"]))[2]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_ray_objects_validate(build):
    objects = _ray_objects(build)
    assert [o["kind"] for o in objects].count("RayService") == 1
    for obj in objects:
        assert obj["apiVersion"] == "ray.io/v1", "use the storage version ray.io/v1"
        assert openapi.errors(_validator(obj["kind"]), obj) == [], f"{build}: {obj['kind']} {obj['metadata']['name']}"
        # RayService names become prefixes of generated object names (Services, Pods): keep them short.
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,28}[a-z0-9])?", obj["metadata"]["name"])


def _prod_rayservice() -> dict:
    return copy.deepcopy(by_kind(render("prod-gpu"), "RayService")[0])


def _breakages():
    def typo(s):
        s["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = s["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling")

    def string_replicas(s):
        s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"

    def no_group_name(s):
        del s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]

    def no_containers(s):
        del s["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]

    def duplicate_env(s):
        env = s["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        env.append(copy.deepcopy(env[0]))

    def bad_quantity_type(s):
        s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [8]

    def bad_enum(s):
        s["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"

    def serve_config_not_a_string(s):
        s["spec"]["serveConfigV2"] = {"applications": []}

    return [typo, string_replicas, no_group_name, no_containers, duplicate_env, bad_quantity_type, bad_enum,
            serve_config_not_a_string]


@pytest.mark.parametrize("breakage", _breakages(), ids=lambda f: f.__name__)
def test_broken_rayservice_is_rejected(breakage):
    svc = _prod_rayservice()
    assert openapi.errors(_validator("RayService"), svc) == []
    breakage(svc)
    assert openapi.errors(_validator("RayService"), svc), f"{breakage.__name__} was accepted"


def test_int_or_string_and_nullable_conversion():
    schema = openapi.to_json_schema({
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "t": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        },
    })
    validator = openapi.CRDValidator(schema)
    assert openapi.errors(validator, {"q": 2, "t": None, "free": {"a": "x", "b": 1}}) == []
    assert openapi.errors(validator, {"q": "2Gi"}) == []
    assert openapi.errors(validator, {"q": 1.5})
    assert openapi.errors(validator, {"unknown": 1})
