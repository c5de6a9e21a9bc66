"""The registry's APIRouter over real HTTP (uvicorn on loopback), Valkey and local storage."""

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI

from adapter_store.routes import build_registry_router

from .peft_fixtures import write_adapter, write_router
from .servers import HttpServer

KEY = "s3cret-key"


@pytest.fixture
def api(registry):
    app = FastAPI()
    app.include_router(build_registry_router(registry, api_key=KEY))
    server = HttpServer(app).start()
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client
    server.stop()


def _files(d):
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(d.iterdir())]


def _tar(d, members=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (members or {f"adapter/{p.name}": p.read_bytes() for p in d.iterdir()}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _assert_error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_upload_files_get_list_delete(api, registry, tmp_path):
    d = write_adapter(tmp_path / "a", rank=8)
    r = api.post("/v1/adapters", data={"name": "math", "description": "d", "tags": "x,y"}, files=_files(d))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["object"] == "adapter" and body["version"] == 1 and body["rank"] == 8 and body["created"]
    assert body["tags"] == ["x", "y"]
    r = api.post("/v1/adapters", data={"name": "math"}, files=_files(d))
    assert r.status_code == 200 and not r.json()["created"] and r.json()["version"] == 1
    got = httpx.get(f"{api.base_url}/v1/adapters/math")  # reads need no key
    assert got.status_code == 200 and got.json()["sha256"] == body["sha256"]
    assert api.get("/v1/adapters/math", params={"version": 1}).json()["version"] == 1
    listing = httpx.get(f"{api.base_url}/v1/adapters", params={"limit": 10}).json()
    assert listing["object"] == "list" and [m["name"] for m in listing["data"]] == ["math"]
    assert [m["version"] for m in api.get("/v1/adapters/math/versions").json()["data"]] == [1]
    r = api.delete("/v1/adapters/math")
    assert r.status_code == 200 and r.json() == {"object": "adapter.deleted", "name": "math", "deleted_versions": [1]}
    _assert_error(api.get("/v1/adapters/math"), 404, "adapter_not_found")


def test_upload_archive(api, tmp_path):
    d = write_adapter(tmp_path / "a")
    r = api.post("/v1/adapters", data={"name": "arch"},
                 files={"archive": ("adapter.tar.gz", _tar(d), "application/gzip")})
    assert r.status_code == 201, r.text
    assert r.json()["target_modules"] == ["q_proj", "v_proj"]


def test_register_by_uri(api, registry, tmp_path):
    write_adapter(registry.storage.root / "incoming" / "u")
    r = api.post("/v1/adapters", json={"name": "by-uri", "uri": f"{registry.storage.uri}/incoming/u"})
    assert r.status_code == 201, r.text
    err = _assert_error(api.post("/v1/adapters", json={"name": "x", "uri": (tmp_path / "a").as_uri()}),
                        403, "uri_outside_storage")
    assert err["param"] == "uri"
    _assert_error(api.post("/v1/adapters", json={"name": "x", "uri": f"{registry.storage.uri}/../../etc"}),
                  403, "uri_outside_storage")
    _assert_error(api.post("/v1/adapters", json={"name": "x"}), 400, "adapter_invalid")
    _assert_error(api.post("/v1/adapters", content=b"{bad", headers={"content-type": "application/json"}),
                  400, "adapter_invalid")


def test_auth_on_mutations_only(api, tmp_path):
    d = write_adapter(tmp_path / "a")
    anon = httpx.Client(base_url=str(api.base_url))
    _assert_error(anon.post("/v1/adapters", data={"name": "a"}, files=_files(d)), 401, "invalid_api_key")
    _assert_error(anon.post("/v1/adapters", data={"name": "a"}, files=_files(d),
                            headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _assert_error(anon.delete("/v1/adapters/a"), 401, "invalid_api_key")
    assert anon.get("/v1/adapters").status_code == 200
    assert api.get("/v1/adapters").json()["data"] == []  # nothing was registered


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("bad-name", 400, "invalid_name"),
        ("pickled", 400, "pickled_weights"),
        ("traversal", 400, "unsafe_archive"),
        ("truncated", 400, "adapter_invalid"),
        ("corrupt", 400, "adapter_invalid"),
        ("shapes", 400, "adapter_invalid"),
        ("rank", 400, "adapter_invalid"),
        ("targets", 400, "adapter_invalid"),
        ("too-large", 413, "adapter_too_large"),
        ("no-files", 400, "adapter_invalid"),
        ("content-type", 400, "adapter_invalid"),
    ],
)
def test_bad_uploads_leave_nothing(api, registry, tmp_path, case, status, code):
    d = write_adapter(tmp_path / "a")
    name, kwargs = "good-name", None
    weights = d / "adapter_model.safetensors"
    if case == "bad-name":
        name = "Bad/Name"
    elif case == "pickled":
        (d / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    elif case == "traversal":
        kwargs = {"files": {"archive": ("a.tar.gz", _tar(d, {"../../etc/evil": b"x"}), "application/gzip")}}
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif case == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"}" * 40)
    elif case == "shapes":
        d = write_adapter(tmp_path / "b", config={}, tensors={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": __import__("numpy").zeros((4, 63), "float16"),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": __import__("numpy").zeros((64, 4), "float16"),
        })
    elif case == "rank":
        d = write_adapter(tmp_path / "b", rank=32)
    elif case == "targets":
        d = write_adapter(tmp_path / "b", config={"target_modules": ["q_proj", "v_proj", "embed_tokens"]})
    elif case == "too-large":
        weights.write_bytes(b"\0" * (registry.limits.max_adapter_bytes + 10))
    elif case == "no-files":
        kwargs = {"data": {"name": name}, "files": {"note": (None, "x")}}
    elif case == "content-type":
        kwargs = {"content": b"name=x", "headers": {"content-type": "text/plain"}}
    if kwargs is None:
        kwargs = {"data": {"name": name}, "files": _files(d)}
    err = _assert_error(api.post("/v1/adapters", **kwargs), status, code)
    assert err["type"] in ("invalid_request_error", "permission_error")
    assert api.get("/v1/adapters").json()["data"] == []
    assert list(registry.storage.list_blobs()) == [] and registry.events.read() == []
    assert list(registry.staging_dir.iterdir()) == []


def test_unknown_and_bad_params(api):
    _assert_error(api.get("/v1/adapters/missing"), 404, "adapter_not_found")
    _assert_error(api.delete("/v1/adapters/missing"), 404, "adapter_not_found")
    _assert_error(api.get("/v1/routers/missing"), 404, "router_not_found")
    err = _assert_error(api.get("/v1/adapters", params={"limit": 0}), 400, "invalid_request")
    assert err["param"] == "limit"
    _assert_error(api.get("/v1/adapters/ok", params={"version": "x"}), 400, "invalid_request")


def test_routers_over_http(api, tmp_path):
    for n in ("ra", "rb"):
        api.post("/v1/adapters", data={"name": n}, files=_files(write_adapter(tmp_path / n, seed=len(n) + ord(n[1]))))
    rd = write_router(tmp_path / "router", ["ra", "rb"])
    r = api.post("/v1/routers", data={"name": "gate", "kind": "gate", "adapters": "ra,rb"}, files=_files(rd))
    assert r.status_code == 201, r.text
    assert r.json()["object"] == "router" and r.json()["adapters"] == ["ra", "rb"]
    assert [m["name"] for m in api.get("/v1/routers").json()["data"]] == ["gate"]
    _assert_error(api.post("/v1/routers", data={"name": "g2", "kind": "gate", "adapters": "ra,zz"}, files=_files(rd)),
                  404, "adapter_not_found")
    _assert_error(api.post("/v1/routers", data={"name": "g2", "kind": "nope", "adapters": "ra"}, files=_files(rd)),
                  400, "router_invalid")
    # Uploads that miss their files or name are refused as routers, not as adapters.
    r = api.post("/v1/routers", data={"name": "g3", "kind": "gate", "adapters": "ra"}, files={"x": ("", b"")})
    _assert_error(r, 400, "router_invalid")
    assert "router's files" in r.json()["error"]["message"]
    r = api.post("/v1/routers", data={"kind": "gate", "adapters": "ra"}, files=_files(rd))
    assert _assert_error(r, 400, "router_invalid")["param"] == "name"
    assert api.delete("/v1/routers/gate").json()["deleted_versions"] == [1]


def test_twenty_concurrent_uploads_of_one_name(api, tmp_path):
    dirs = [write_adapter(tmp_path / f"c{i}", seed=100 + i) for i in range(20)]

    def post(d):
        return api.post("/v1/adapters", data={"name": "hot"}, files=_files(d))

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, dirs))
    assert [r.status_code for r in responses] == [201] * 20
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 21))
    versions = api.get("/v1/adapters/hot/versions").json()["data"]
    assert [v["version"] for v in versions] == list(range(1, 21))
    assert len({v["sha256"] for v in versions}) == 20


def test_registry_down_is_503(registry, tmp_path):
    from adapter_store.redis_conn import connect
    from adapter_store.registry import Registry

    from .servers import free_port

    down = Registry(connect(f"redis://127.0.0.1:{free_port()}", retries=1, backoff_base_s=0.01),
                    registry.storage, registry.cache, registry.base_model, staging_dir=tmp_path / "st")
    app = FastAPI()
    app.include_router(build_registry_router(down))
    server = HttpServer(app).start()
    try:
        _assert_error(httpx.get(f"{server.url}/v1/adapters/x"), 503, "registry_unavailable")
        d = write_adapter(tmp_path / "a")
        _assert_error(httpx.post(f"{server.url}/v1/adapters", data={"name": "x"}, files=_files(d)),
                      503, "registry_unavailable")
    finally:
        server.stop()
