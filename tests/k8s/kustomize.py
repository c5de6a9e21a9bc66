"""A small kustomize renderer for the subset k8s/ uses, so the tests build the overlays on machines
without the kustomize (or kubectl) binary. Where the binary exists, a test checks that this renderer
and `kubectl kustomize` produce the same objects.

Supported (anything else raises `Unsupported`, so a new feature in k8s/ fails loudly here instead
of being silently ignored):
  Kustomization / Component fields: resources (local files and directories), components,
    patches (path or inline patch, optional target), labels (pairs; includeSelectors and
    includeTemplates false), images (name, newName, newTag, digest).
  Patches: JSON 6902 (a YAML/JSON list of add, remove, replace, test ops) and strategic merge
    (a mapping). A strategic-merge patch here is a recursive map merge where null deletes a key;
    it may not contain lists on built-in kinds, because kustomize merges those by key (containers
    by name, ...) and this renderer does not. On custom resources kustomize replaces lists
    wholesale, which is what this renderer does.
  Targets: group, version, kind, name, namespace, each an anchored regular expression as in
    kustomize. A patch that matches nothing is an error (kustomize ignores a targeted patch that
    matches nothing; here it is a bug in the overlay).
Order, as kustomize: resources, then components (each transforms everything accumulated so far),
then this kustomization's patches, labels, images. Duplicate resource ids are an error.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "labels", "images"}
_TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


class BuildError(ValueError):
    """The kustomization is wrong (missing file, bad patch, duplicate object, ...)."""


def load_yaml_docs(path: Path) -> list[Any]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise BuildError(f"no kustomization file in {directory}")


def resource_id(obj: dict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def build(directory: str | Path) -> list[dict]:
    """Render the kustomization in `directory` into a list of objects (kustomize build)."""
    return _build(Path(directory).resolve(), expect_kind="Kustomization", accumulated=None)


def _build(directory: Path, expect_kind: str, accumulated: list[dict] | None) -> list[dict]:
    path = find_kustomization(directory)
    docs = load_yaml_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise BuildError(f"{path}: expected one mapping")
    kust = docs[0]
    kind = kust.get("kind", "Kustomization")
    if kind != expect_kind:
        raise BuildError(f"{path}: kind {kind!r}, expected {expect_kind!r}")
    unknown = set(kust) - _FIELDS
    if unknown:
        raise Unsupported(f"{path}: fields {sorted(unknown)} are not supported by this renderer")

    objects: list[dict] = [] if accumulated is None else accumulated
    for entry in kust.get("resources") or []:
        _add(objects, _load_resource(directory, entry), path)
    for entry in kust.get("components") or []:
        component = (directory / entry).resolve()
        if not component.is_dir():
            raise BuildError(f"{path}: component {entry!r} is not a directory")
        objects = _build(component, expect_kind="Component", accumulated=objects)
    for patch in kust.get("patches") or []:
        _apply_patch(objects, directory, patch, path)
    for label in kust.get("labels") or []:
        _apply_labels(objects, label, path)
    for image in kust.get("images") or []:
        _apply_image(objects, image, path)
    return objects


def _add(objects: list[dict], new: list[dict], origin: Path) -> None:
    seen = {resource_id(o) for o in objects}
    for obj in new:
        rid = resource_id(obj)
        if rid in seen:
            raise BuildError(f"{origin}: duplicate object {rid}")
        seen.add(rid)
        objects.append(obj)


def _load_resource(directory: Path, entry: str) -> list[dict]:
    if "://" in entry or entry.startswith("git@"):
        raise Unsupported(f"remote resource {entry!r}")
    target = (directory / entry).resolve()
    if target.is_dir():
        return _build(target, expect_kind="Kustomization", accumulated=None)
    if not target.is_file():
        raise BuildError(f"resource {entry!r} not found under {directory}")
    docs = load_yaml_docs(target)
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise BuildError(f"{target}: every document must be an object with apiVersion and kind")
    return docs


# --- patches ---------------------------------------------------------------------------------------


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(obj: dict, target: dict) -> bool:
    group, version = _split_api_version(obj.get("apiVersion", ""))
    meta = obj.get("metadata") or {}
    actual = {"group": group, "version": version, "kind": obj.get("kind", ""),
              "name": meta.get("name", ""), "namespace": meta.get("namespace", "")}
    return all(re.fullmatch(str(pattern), actual[key]) for key, pattern in target.items())


def _apply_patch(objects: list[dict], directory: Path, entry: dict, origin: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise Unsupported(f"{origin}: patch fields {sorted(unknown)}")
    if ("path" in entry) == ("patch" in entry):
        raise BuildError(f"{origin}: a patch needs exactly one of path and patch")
    if "path" in entry:
        text = (directory / entry["path"]).read_text()
    else:
        text = entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise Unsupported(f"{origin}: a patch must hold exactly one document")
    body = docs[0]
    target = entry.get("target")
    if target is not None:
        unknown = set(target) - _TARGET_FIELDS
        if unknown:
            raise Unsupported(f"{origin}: target selectors {sorted(unknown)}")

    if isinstance(body, list):
        if target is None:
            raise BuildError(f"{origin}: a JSON 6902 patch needs a target")
        hits = [o for o in objects if _matches(o, target)]
        for obj in hits:
            patched = json6902(obj, body)
            obj.clear()
            obj.update(patched)
    elif isinstance(body, dict):
        if target is None:
            group, version = _split_api_version(body.get("apiVersion", ""))
            target = {"group": re.escape(group), "version": re.escape(version),
                      "kind": re.escape(body.get("kind", "")),
                      "name": re.escape((body.get("metadata") or {}).get("name", ""))}
        hits = [o for o in objects if _matches(o, target)]
        for obj in hits:
            patch = copy.deepcopy(body)
            # The patch's own identity fields never rename the target.
            for key in ("apiVersion", "kind"):
                patch.pop(key, None)
            meta = patch.get("metadata")
            if isinstance(meta, dict):
                meta.pop("name", None)
                meta.pop("namespace", None)
            _check_smp_lists(patch, obj, origin)
            merged = strategic_merge(obj, patch)
            obj.clear()
            obj.update(merged)
    else:
        raise BuildError(f"{origin}: a patch must be a list (JSON 6902) or a mapping (strategic merge)")
    if not hits:
        raise BuildError(f"{origin}: patch {entry.get('path', '<inline>')} matches no object")


def _is_builtin(obj: dict) -> bool:
    group, _ = _split_api_version(obj.get("apiVersion", ""))
    return group == "" or "." not in group or group.endswith(".k8s.io")


def _check_smp_lists(patch: Any, obj: dict, origin: Path) -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and key.startswith("$"):
                    raise Unsupported(f"{origin}: strategic-merge directive {key} at {where}")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list) and _is_builtin(obj):
            raise Unsupported(
                f"{origin}: strategic-merge patch has a list at {where} on built-in kind {obj.get('kind')}; "
                "kustomize merges those by key, which this renderer does not. Use a JSON 6902 patch."
            )

    walk(patch, "")


def strategic_merge(base: Any, patch: Any) -> Any:
    """Map merge: keys of `patch` override, None deletes, anything else (lists too) replaces."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise BuildError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list, token: str, path: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise BuildError(f"{path}: {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        raise BuildError(f"{path}: index {i} out of range (length {len(container)})")
    return i


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise BuildError(f"{path}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, path, allow_end=False)]
        else:
            raise BuildError(f"{path}: cannot descend into a {type(node).__name__}")
    return node


def json6902(doc: dict, ops: list[dict]) -> dict:
    """Apply RFC 6902 add / remove / replace / test ops; return a new document."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or not isinstance(path, str):
            raise Unsupported(f"JSON 6902 op {op!r}")
        tokens = _pointer(path)
        if not tokens:
            raise Unsupported("JSON 6902 op on the whole document")
        parent, last = _parent(doc, tokens, path), tokens[-1]
        if kind == "test":
            if isinstance(parent, dict):
                if last not in parent:
                    raise BuildError(f"test {path}: does not exist")
                actual = parent[last]
            else:
                actual = parent[_index(parent, last, path, allow_end=False)]
            if actual != op.get("value"):
                raise BuildError(f"test {path}: found {actual!r}, expected {op.get('value')!r}")
        elif kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, dict):
                parent[last] = value
            else:
                parent.insert(_index(parent, last, path, allow_end=True), value)
        elif kind == "remove":
            if isinstance(parent, dict):
                if last not in parent:
                    raise BuildError(f"remove {path}: does not exist")
                del parent[last]
            else:
                del parent[_index(parent, last, path, allow_end=False)]
        else:  # replace
            value = copy.deepcopy(op["value"])
            if isinstance(parent, dict):
                if last not in parent:
                    raise BuildError(f"replace {path}: does not exist")
                parent[last] = value
            else:
                parent[_index(parent, last, path, allow_end=False)] = value
    return doc


# --- labels and images -----------------------------------------------------------------------------


def _apply_labels(objects: list[dict], entry: dict, origin: Path) -> None:
    unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise Unsupported(f"{origin}: labels entry {entry!r} (only pairs, without selectors or templates)")
    for obj in objects:
        labels = obj.setdefault("metadata", {}).setdefault("labels", {})
        labels.update({str(k): str(v) for k, v in (entry.get("pairs") or {}).items()})


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    # A ':' after the last '/' starts the tag; one before it belongs to a registry host:port.
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _apply_image(objects: list[dict], entry: dict, origin: Path) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown or "name" not in entry:
        raise Unsupported(f"{origin}: images entry {entry!r}")

    def rewrite(image: str) -> str:
        name = entry.get("newName", _image_name(image))
        rest = image[len(_image_name(image)):]
        if "digest" in entry:
            return f"{name}@{entry['digest']}"
        if "newTag" in entry:
            return f"{name}:{entry['newTag']}"
        return name + rest

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            if _image_name(container["image"]) == entry["name"]:
                                container["image"] = rewrite(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj)
