"""Registry against the real embedded Valkey server and local storage."""

import threading

import pytest

from adapter_store.errors import AdapterInvalid, AdapterNotFound, AdapterTooLarge, InvalidName, RouterInvalid, RouterNotFound
from adapter_store.registry import StoreLimits
from adapter_store.storage_base import hash_file

from .peft_fixtures import write_adapter, write_router


def test_register_get_load(registry, tmp_path, signature):
    d = write_adapter(tmp_path / "a", rank=8, modules=("q_proj", "v_proj", "up_proj"))
    res = registry.register_adapter(d, "math", description="GSM8K", tags=["math", "en"])
    m = res.manifest
    assert res.created and m.version == 1 and m.rank == 8 and m.alpha == 16.0
    assert m.target_modules == ["q_proj", "up_proj", "v_proj"] and m.base_model.id == signature.id
    assert m.tags == ["en", "math"] and m.dtype == "F16" and m.size == sum(f.size for f in m.files)
    assert registry.get_adapter("math") == m and registry.get_adapter("math", 1) == m
    loaded = registry.load_adapter("math")
    for f in m.files:
        assert hash_file(loaded.path / f.path) == (f.sha256, f.size)
        assert (loaded.path / f.path).read_bytes() == (d / f.path).read_bytes()


def test_same_content_is_idempotent_new_content_is_next_version(registry, tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2)
    first = registry.register_adapter(a, "code")
    again = registry.register_adapter(a, "code")
    assert not again.created and again.manifest == first.manifest
    second = registry.register_adapter(b, "code")
    assert second.created and second.manifest.version == 2
    assert registry.get_adapter("code").version == 2 and registry.get_adapter("code", 1).sha256 == first.manifest.sha256
    assert [m.version for m in registry.adapter_versions("code")] == [1, 2]


def test_unknown_adapter_and_bad_names(registry):
    with pytest.raises(AdapterNotFound, match="'nope' is not registered"):
        registry.get_adapter("nope")
    for bad in ["", "UPPER", "a/b", "../x", "-lead", "x" * 65, "a..b", "sp ace"]:
        with pytest.raises(InvalidName):
            registry.get_adapter(bad)


def test_an_adapter_may_not_take_the_base_models_name(registry, tmp_path, signature):
    """`model` equal to the base model's name serves the base model: an adapter of that name
    would be listed and never served."""
    d = write_adapter(tmp_path / "a")
    for register in (lambda: registry.register_adapter(d, signature.name),
                     lambda: registry.register_adapter_from_uri("file:///nowhere", signature.name)):
        with pytest.raises(InvalidName, match="base model's name"):
            register()
    assert registry.list_adapters().items == [] and list(registry.storage.list_blobs()) == []


def test_a_manifest_that_does_not_decode_leaves_listings_working(registry, tmp_path):
    """A record no release can read (an older release's, or one edited by hand) is skipped by
    listings, with a log line, instead of failing every listing."""
    registry.register_adapter(write_adapter(tmp_path / "a", seed=1), "good")
    registry.register_adapter(write_adapter(tmp_path / "b", seed=2), "broken")
    registry.client.hset(registry.adapters._k("broken", "versions"), "1", '{"name": "broken", "alpha": null}')
    assert [m.name for m in registry.list_adapters().items] == ["good"]
    with pytest.raises(ValueError):
        registry.get_adapter("broken")


def test_invalid_adapter_publishes_nothing(registry, tmp_path):
    d = write_adapter(tmp_path / "a", rank=32)
    with pytest.raises(AdapterInvalid, match="maximum rank"):
        registry.register_adapter(d, "big")
    assert registry.list_adapters().items == [] and list(registry.storage.list_blobs()) == []
    with pytest.raises(AdapterNotFound):
        registry.get_adapter("big")


def test_size_cap(registry, tmp_path):
    d = write_adapter(tmp_path / "a", rank=16, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"), layers=range(2))
    registry.limits = StoreLimits(max_adapter_bytes=10_000, max_rank=16)
    with pytest.raises(AdapterTooLarge, match="over the cap of 10000"):
        registry.register_adapter(d, "big")
    assert list(registry.storage.list_blobs()) == []


def test_list_pagination_and_filters(registry, tmp_path):
    for i in range(7):
        d = write_adapter(tmp_path / f"a{i}", seed=i)
        registry.register_adapter(d, f"ad-{i}", tags=["even"] if i % 2 == 0 else ["odd"])
    registry.register_adapter(write_adapter(tmp_path / "z", seed=99), "zz")
    names, cursor = [], None
    while True:
        page = registry.list_adapters(limit=3, cursor=cursor)
        names += [m.name for m in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert names == [f"ad-{i}" for i in range(7)] + ["zz"]
    assert [m.name for m in registry.list_adapters(tag="even").items] == ["ad-0", "ad-2", "ad-4", "ad-6"]
    page = registry.list_adapters(tag="odd", limit=2)
    assert [m.name for m in page.items] == ["ad-1", "ad-3"]
    assert [m.name for m in registry.list_adapters(tag="odd", cursor=page.next_cursor).items] == ["ad-5"]
    assert [m.name for m in registry.list_adapters(prefix="z").items] == ["zz"]
    with pytest.raises(AdapterInvalid, match="limit"):
        registry.list_adapters(limit=0)


def test_delete_tombstones_and_versions_stay_monotonic(registry, tmp_path):
    a, b = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2)
    registry.register_adapter(a, "x")
    registry.register_adapter(b, "x")
    assert registry.delete_adapter("x", version=2) == [2]
    assert registry.get_adapter("x").version == 1
    with pytest.raises(AdapterNotFound, match="version 2 was deleted"):
        registry.get_adapter("x", 2)
    assert registry.delete_adapter("x") == [1]
    with pytest.raises(AdapterNotFound, match="deleted"):
        registry.get_adapter("x")
    assert registry.list_adapters().items == []
    with pytest.raises(AdapterNotFound):
        registry.delete_adapter("x")
    again = registry.register_adapter(a, "x")
    assert again.created and again.manifest.version == 3


def test_garbage_collection_keeps_live_blobs(registry, tmp_path):
    a, b = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2)
    ma = registry.register_adapter(a, "keep").manifest
    mb = registry.register_adapter(b, "drop").manifest
    registry.delete_adapter("drop")
    assert registry.collect_garbage(grace_s=3600) == []  # too recent
    removed = set(registry.collect_garbage(grace_s=0))
    drop_only = {f.sha256 for f in mb.files} - {f.sha256 for f in ma.files}
    assert removed == drop_only
    assert {b.sha256 for b in registry.storage.list_blobs()} == {f.sha256 for f in ma.files}
    registry.load_adapter("keep")


def test_register_from_uri(registry, tmp_path):
    root = registry.storage.root
    d = write_adapter(root / "uploads" / "u1")
    m = registry.register_adapter_from_uri(f"{registry.storage.uri}/uploads/u1", "from-uri").manifest
    assert m.version == 1 and registry.load_adapter("from-uri").path.is_dir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04x")
    with pytest.raises(AdapterInvalid, match="pickled"):
        registry.register_adapter_from_uri(f"{registry.storage.uri}/uploads/u1", "pickled")
    with pytest.raises(AdapterInvalid, match="outside"):
        registry.register_adapter_from_uri((tmp_path / "a").as_uri(), "outside")
    assert [m.name for m in registry.list_adapters().items] == ["from-uri"]


def test_routers(registry, tmp_path):
    for n in ("r-a", "r-b"):
        registry.register_adapter(write_adapter(tmp_path / n, seed=hash(n) % 100), n)
    rd = write_router(tmp_path / "router", ["r-a", "r-b"])
    res = registry.register_router(rd, "gate1", kind="gate", adapters=["r-a", "r-b"], tags=["moe"])
    m = res.manifest
    assert res.created and m.version == 1 and m.adapters == ["r-a", "r-b"] and m.kind == "gate"
    assert m.weights_sha256 == hash_file(rd / "router.safetensors")[0]
    assert not registry.register_router(rd, "gate1", kind="gate", adapters=["r-a", "r-b"]).created
    rd2 = write_router(tmp_path / "router2", ["r-b", "r-a"])
    assert registry.register_router(rd2, "gate1", kind="gate", adapters=["r-b", "r-a"]).manifest.version == 2
    assert (registry.load_router("gate1").path / "router.json").is_file()
    with pytest.raises(AdapterNotFound, match="missing"):
        registry.register_router(rd, "gate2", kind="gate", adapters=["r-a", "missing"])
    with pytest.raises(RouterInvalid, match="kind"):
        registry.register_router(rd, "gate2", kind="wat", adapters=["r-a"])
    (rd / "router.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(RouterInvalid):
        registry.register_router(rd, "gate2", kind="gate", adapters=["r-a"])
    assert [r.name for r in registry.list_routers().items] == ["gate1"]
    assert registry.delete_router("gate1") == [1, 2]
    with pytest.raises(RouterNotFound):
        registry.get_router("gate1")


def test_events_stream_catch_up_and_pubsub(registry, tmp_path):
    start = registry.events.last_id()
    with registry.events.subscribe() as sub:
        registry.register_adapter(write_adapter(tmp_path / "a"), "ev")
        live = sub.get(timeout_s=5)
        registry.delete_adapter("ev")
        live2 = sub.get(timeout_s=5)
    assert (live.type, live.name, live.version) == ("adapter.registered", "ev", 1)
    assert (live2.type, live2.version) == ("adapter.deleted", 1)
    # a replica that was down catches up from its last id
    missed = registry.events.read(after=start)
    assert [(e.type, e.name, e.version) for e in missed] == [("adapter.registered", "ev", 1), ("adapter.deleted", "ev", 1)]
    assert missed[0].id == live.id and missed[0].sha256 == registry.events.read(after=start)[0].sha256
    assert registry.events.read(after=missed[-1].id) == []


def test_concurrent_registrations_of_one_name(registry, tmp_path):
    dirs = [write_adapter(tmp_path / f"c{i}", seed=i) for i in range(20)]
    results, errors = [], []

    def go(d):
        try:
            results.append(registry.register_adapter(d, "busy").manifest)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(m.version for m in results) == list(range(1, 21))
    assert len({m.sha256 for m in results}) == 20
    assert [m.version for m in registry.adapter_versions("busy")] == list(range(1, 21))
    assert registry.get_adapter("busy").version == 20
