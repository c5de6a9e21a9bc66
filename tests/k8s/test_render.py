"""Every file under k8s/ parses, every build renders, and the Python renderer agrees with kustomize."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.k8s import kustomize
from tests.k8s.manifests import BUILDS, K8S, render, by_kind


def _yaml_files():
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_k8s_tree_has_manifests():
    assert len(_yaml_files()) >= 10
    assert (K8S / "Dockerfile").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_parses(path):
    docs = kustomize.load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if isinstance(doc, list):  # a JSON 6902 patch file
            assert all(isinstance(op, dict) and "op" in op and "path" in op for op in doc)
        else:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: no apiVersion/kind"


def test_every_yaml_file_is_used():
    """No stray manifest: each file is a kustomization, or referenced by one."""
    used = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        used.add(kfile)
        kust = yaml.safe_load(kfile.read_text())
        for entry in kust.get("resources", []) + [p["path"] for p in kust.get("patches", []) if "path" in p]:
            used.add((kfile.parent / entry).resolve())
    assert set(_yaml_files()) - used == set()


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_build_renders(build):
    objects = render(build)
    kinds = {o["kind"] for o in objects}
    assert {"RayService", "ConfigMap"} <= kinds
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "molora-serve"


@pytest.mark.parametrize("overlay", ["dev-cpu", "prod-gpu"])
def test_overlays_include_redis_and_set_image(overlay):
    objects = render(overlay)
    assert by_kind(objects, "StatefulSet") and by_kind(objects, "Service")
    images = {c["image"] for o in by_kind(objects, "RayService")
              for g in [o["spec"]["rayClusterConfig"]["headGroupSpec"], *o["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and ":" in images.pop(), "the overlay must name one tagged image"


def _kustomize_command():
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_renderer_matches_kustomize_binary(build):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the Python renderer is the only build")
    out = subprocess.run([*command, str(BUILDS[build])], check=True, capture_output=True, text=True, timeout=60).stdout
    theirs = {kustomize.resource_id(o): o for o in yaml.safe_load_all(out) if o}
    ours = {kustomize.resource_id(o): o for o in render(build)}
    assert sorted(ours) == sorted(theirs)
    for rid in ours:
        assert ours[rid] == theirs[rid], f"{rid} differs from {' '.join(command)}"


# --- the renderer itself ----------------------------------------------------------------------------


def test_json6902_ops():
    doc = {"a": {"list": [1, 2], "x": "old"}}
    out = kustomize.json6902(doc, [
        {"op": "test", "path": "/a/x", "value": "old"},
        {"op": "replace", "path": "/a/x", "value": "new"},
        {"op": "add", "path": "/a/list/-", "value": 3},
        {"op": "add", "path": "/a/list/0", "value": 0},
        {"op": "remove", "path": "/a/list/1"},
        {"op": "add", "path": "/a/b~1c", "value": {"k": 1}},
    ])
    assert out == {"a": {"list": [0, 2, 3], "x": "new", "b/c": {"k": 1}}}
    assert doc == {"a": {"list": [1, 2], "x": "old"}}, "the input is not modified"


@pytest.mark.parametrize("op", [
    {"op": "test", "path": "/a", "value": 2},
    {"op": "replace", "path": "/missing", "value": 1},
    {"op": "remove", "path": "/l/5"},
    {"op": "add", "path": "/no/such/parent", "value": 1},
])
def test_json6902_failures(op):
    with pytest.raises(kustomize.BuildError):
        kustomize.json6902({"a": 1, "l": []}, [op])


def test_json6902_unsupported_op():
    with pytest.raises(kustomize.Unsupported):
        kustomize.json6902({"a": 1}, [{"op": "move", "from": "/a", "path": "/b"}])


def test_strategic_merge_maps():
    base = {"data": {"A": "1", "B": "2"}, "list": [1, 2]}
    assert kustomize.strategic_merge(base, {"data": {"B": "3", "A": None}, "list": [9]}) == {"data": {"B": "3"}, "list": [9]}


def _write_kustomization(tmp_path, kust, files):
    for name, docs in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(docs))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kust))


def test_images_and_labels(tmp_path):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "app:1"}, {"name": "b", "image": "reg:5000/other:2"}]}}
    _write_kustomization(tmp_path, {
        "resources": ["pod.yaml"],
        "labels": [{"pairs": {"team": "x"}}],
        "images": [{"name": "app", "newName": "reg.io/app", "newTag": "2"},
                   {"name": "reg:5000/other", "digest": "sha256:abc"}],
    }, {"pod.yaml": [pod]})
    [out] = kustomize.build(tmp_path)
    assert [c["image"] for c in out["spec"]["containers"]] == ["reg.io/app:2", "reg:5000/other@sha256:abc"]
    assert out["metadata"]["labels"] == {"team": "x"}


@pytest.mark.parametrize("kust,error", [
    ({"resources": ["pod.yaml"], "namePrefix": "x-"}, kustomize.Unsupported),
    ({"resources": ["pod.yaml", "pod.yaml"]}, kustomize.BuildError),
    ({"resources": ["missing.yaml"]}, kustomize.BuildError),
    ({"resources": ["pod.yaml"], "patches": [{"patch": "apiVersion: v1\nkind: Pod\nmetadata: {name: nope}\n"}]},
     kustomize.BuildError),
    ({"resources": ["pod.yaml"], "patches": [{"patch": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
                                                      "spec: {containers: [{name: a, image: b}]}\n"}]},
     kustomize.Unsupported),
    ({"resources": ["pod.yaml"], "labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]}, kustomize.Unsupported),
])
def test_renderer_refuses(tmp_path, kust, error):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    _write_kustomization(tmp_path, kust, {"pod.yaml": [pod]})
    with pytest.raises(error):
        kustomize.build(tmp_path)
