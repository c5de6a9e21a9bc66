"""Bad input is a 4xx that leaves nothing behind, and unreferenced blobs are reclaimed without
ever taking a blob from a registration in flight. Real HTTP, Valkey and local storage."""

import io
import tarfile
import time
import zipfile

import httpx
import pytest
from fastapi import FastAPI

from adapter_store.errors import IntegrityError, InvalidName, RegistryUnavailable, StorageUnavailable
from adapter_store.routes import build_registry_router
from adapter_store.storage_local import LocalStorage

from .peft_fixtures import write_adapter, write_router
from .servers import HttpServer


@pytest.fixture
def api(registry):
    app = FastAPI()
    app.include_router(build_registry_router(registry))
    server = HttpServer(app).start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


def _files(d):
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(d.iterdir())]


def _blobs(registry):
    return {b.sha256 for b in registry.storage.list_blobs()}


def _live(registry):
    return {f.sha256 for t in (registry.adapters, registry.routers) for m in t.all_live() for f in m.files}


def _archive(kind, members):
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_infinite_alpha_is_a_400_and_listings_keep_working(api, registry, tmp_path):
    d = write_adapter(tmp_path / "a")
    cfg = (d / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 1e999')
    (d / "adapter_config.json").write_text(cfg)
    r = api.post("/v1/adapters", data={"name": "inf"}, files=_files(d))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_alpha", r.text
    assert api.get("/v1/adapters").status_code == 200 and api.get("/v1/adapters").json()["data"] == []
    assert api.get("/v1/adapters/inf").status_code == 404 and _blobs(registry) == set()


@pytest.mark.parametrize("kind, member, status", [("tar", ".", 400), ("tar", "./", 400), ("zip", ".", 400),
                                                  ("tar", "unpacked", 201)])
def test_archive_member_names_are_not_a_500(api, registry, tmp_path, kind, member, status):
    d = write_adapter(tmp_path / "a")
    members = {p.name: p.read_bytes() for p in d.iterdir()} | {member: b"x"}
    r = api.post("/v1/adapters", data={"name": "arch"}, files={"archive": (f"a.{kind}", _archive(kind, members))})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "unsafe_archive" and repr(member) in r.json()["error"]["message"]
    assert list(registry.staging_dir.iterdir()) == []


@pytest.mark.parametrize("tail", ["x%00y", "a" * 300])
def test_bad_uri_paths_are_a_400(api, registry, tail):
    r = api.post("/v1/adapters", json={"name": "u", "uri": f"{registry.storage.uri}/{tail}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "uri", r.text


def test_name_with_trailing_newline_is_refused_before_any_blob(api, registry, tmp_path):
    d = write_adapter(tmp_path / "a")
    with pytest.raises(InvalidName):
        registry.register_adapter(d, "nl\n")
    r = api.post("/v1/adapters", data={"name": "nl\n"}, files=_files(d))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", r.text
    r = api.post("/v1/routers", data={"name": "nlr\n", "kind": "gate", "adapters": "x"},
                 files=_files(write_router(tmp_path / "g", ["x"])))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", r.text
    assert _blobs(registry) == set()


def test_chunked_json_body_is_read(api, registry):
    body = b'{"name": "chunked", "uri": "' + f"{registry.storage.uri}/missing".encode() + b'"}'
    r = api.post("/v1/adapters", content=iter([body]), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"], r.text
    r = api.post("/v1/adapters", content=iter([b" " * (70 << 10)]), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_delete_of_an_adapter_a_router_uses_is_409(api, registry, tmp_path):
    for i, n in enumerate(("a1", "a2")):
        registry.register_adapter(write_adapter(tmp_path / n, seed=i), n)
    registry.register_router(write_router(tmp_path / "g", ["a1", "a2"]), "gate", kind="gate", adapters=["a1", "a2"])
    r = api.delete("/v1/adapters/a2")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use" and "gate" in r.text
    assert api.get("/v1/adapters/a2").status_code == 200


class FailingVerify(LocalStorage):
    """Fault injector: the n-th verify_blob fails as a corrupted upload would."""

    def __init__(self, uri, fail_at):
        super().__init__(uri)
        self.calls, self.fail_at = 0, fail_at

    def verify_blob(self, sha256, size):
        self.calls += 1
        if self.calls == self.fail_at:
            raise IntegrityError(f"blob {sha256} injected fault")
        super().verify_blob(sha256, size)


def test_failed_upload_removes_the_blobs_it_wrote(registry, tmp_path):
    registry.storage = FailingVerify(registry.storage.uri, fail_at=2)
    with pytest.raises(IntegrityError):
        registry.register_adapter(write_adapter(tmp_path / "a"), "x")
    assert _blobs(registry) == set()


def test_failed_publish_keeps_only_blobs_a_manifest_references(registry, tmp_path, monkeypatch):
    kept = registry.register_adapter(write_adapter(tmp_path / "a", seed=1), "keep").manifest
    real = registry.adapters.publish

    def down(*args, **kwargs):
        raise RegistryUnavailable("injected: Redis went away during publish")

    monkeypatch.setattr(registry.adapters, "publish", down)
    with pytest.raises(RegistryUnavailable):  # same adapter_config.json blob as "keep", new weights
        registry.register_adapter(write_adapter(tmp_path / "b", seed=2), "lost")
    assert _blobs(registry) == {f.sha256 for f in kept.files}
    monkeypatch.setattr(registry.adapters, "publish", real)
    registry.load_adapter("keep")


def test_collector_runs_after_a_delete_over_http(api, registry, tmp_path):
    registry.gc_grace_s = 0
    for i, n in enumerate(("keep", "drop")):
        registry.register_adapter(write_adapter(tmp_path / n, seed=i, rank=4 + i), n)
    assert api.delete("/v1/adapters/drop").status_code == 200
    deadline = time.monotonic() + 10
    while _blobs(registry) != _live(registry) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _blobs(registry) == _live(registry) and len(_live(registry)) == 2


def test_claimed_blobs_survive_collection(registry, tmp_path):
    m = registry.register_adapter(write_adapter(tmp_path / "a"), "x").manifest
    registry.delete_adapter("x")
    registry.collector.stop()
    shas = sorted(f.sha256 for f in m.files)
    registry.claims.claim(shas, "in-flight")  # a registration of the same content between store and publish
    assert registry.collect_garbage(grace_s=0) == [] and _blobs(registry) == set(shas)
    registry.claims.release(shas, "in-flight")
    assert sorted(registry.collect_garbage(grace_s=0)) == shas and _blobs(registry) == set()


def test_claim_waits_while_a_blob_is_being_deleted(registry):
    sha = "ab" * 32
    assert registry.claims.mark_deleting(sha, "deleter")
    registry.claims.wait_s = 0.2
    with pytest.raises(StorageUnavailable, match="being deleted"):
        registry.claims.claim([sha], "registration")
    registry.claims.unmark(sha, "deleter")
    registry.claims.claim([sha], "registration")
    assert not registry.claims.mark_deleting(sha, "deleter")  # claimed: no delete may start
