"""Validate objects against a CustomResourceDefinition's OpenAPI v3 schema with jsonschema.

A CRD's `spec.versions[].schema.openAPIV3Schema` is a structural schema in OpenAPI 3.0's dialect of
JSON Schema (boolean exclusiveMinimum, `nullable`, `x-kubernetes-*` extensions). The conversion:
  - `nullable: true` adds "null" to the type;
  - `x-kubernetes-int-or-string` needs nothing: controller-gen already writes anyOf integer/string;
  - `x-kubernetes-list-type: map` with `x-kubernetes-list-map-keys` is checked (no two items with
    the same keys), `set` becomes uniqueItems; `x-kubernetes-validations` (CEL) and the other
    `x-kubernetes-*` keys are dropped;
  - an object schema with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` forbids other fields. The API server would prune them
    silently (or, with kubectl's default strict field validation, reject them); here an unknown
    field, usually a typo, is a validation error.
Validated with jsonschema's Draft 4 rules, the draft OpenAPI 3.0 keeps for exclusiveMinimum.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # PyYAML without libyaml: slower, same result
    _Loader = yaml.SafeLoader


def _list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {list(keys)}: {key}")
        seen[key] = i


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-molora-list-map-keys": _list_map_keys}
)


def to_json_schema(node: Any) -> Any:
    """Convert one OpenAPI v3 (Kubernetes structural) schema node, recursively."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(value)
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "map" and node.get("x-kubernetes-list-map-keys"):
        out["x-molora-list-map-keys"] = list(node["x-kubernetes-list-map-keys"])
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def load_crd(path: str) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


@functools.lru_cache(maxsize=None)
def crd_validator(path: str, version: str = "v1") -> CRDValidator:
    """The validator for one served version of the CRD at `path`."""
    crd = load_crd(path)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise KeyError(f"{path} serves {sorted(versions)}, not {version!r}")
    schema = to_json_schema(versions[version]["schema"]["openAPIV3Schema"])
    CRDValidator.check_schema(schema)
    return CRDValidator(schema)


def crd_identity(path: str) -> tuple[str, str, list[str]]:
    """(group, kind, served versions) of the CRD at `path`."""
    crd = load_crd(path)
    return crd["spec"]["group"], crd["spec"]["names"]["kind"], [v["name"] for v in crd["spec"]["versions"]]


def errors(validator: CRDValidator, obj: dict) -> list[str]:
    """Every validation error, as 'path: message', sorted by path."""
    found = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def schema_dir(repo_root: Path) -> Path:
    return (repo_root / ".." / "shared" / "schemas" / "kuberay").resolve()
