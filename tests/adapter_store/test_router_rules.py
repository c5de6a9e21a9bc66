"""Routers that register can serve: router.json checked against the registration and the base
model; adapters a router uses cannot be deleted; a router whose adapter is gone says so."""

import dataclasses
import json
import threading
import types

import numpy as np
import pytest

from adapter_store.errors import AdapterInUse, AdapterNotFound, RouterInvalid
from deployments.errors import ApiError
from deployments.resolve import Resolver, split_version

from .peft_fixtures import write_adapter, write_router

NAMES = ["r-a", "r-b", "r-c"]


@pytest.fixture
def adapters(registry, tmp_path):
    for i, n in enumerate(NAMES):
        registry.register_adapter(write_adapter(tmp_path / n, seed=10 + i), n)
    return NAMES


def _without(d, key):
    cfg = json.loads((d / "router.json").read_text())
    del cfg[key]
    (d / "router.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "case, match",
    [("reordered", "same order"), ("subset", "same order"), ("no-router-json", r"missing \['router.json'\]"),
     ("no-hidden-size", "hidden_size"), ("wrong-hidden-size", "base model's hidden size is 64"),
     ("top-k-too-big", "top_k=9"), ("weight-shape", "gate.weight has shape"), ("no-bias", "expected exactly"),
     ("extra-tensor", "expected exactly"), ("kind", "kind"), ("default-top-k-one-adapter", "top_k=2")],
)
def test_unservable_gate_routers_are_refused(registry, adapters, tmp_path, case, match):
    d, names = tmp_path / "router", adapters
    rng = np.random.default_rng(0)
    if case == "reordered":
        write_router(d, [names[1], names[0], names[2]])
    elif case == "subset":
        write_router(d, names[:2])
    elif case == "no-router-json":
        (write_router(d, names) / "router.json").unlink()
    elif case == "no-hidden-size":
        _without(write_router(d, names), "hidden_size")
    elif case == "wrong-hidden-size":
        write_router(d, names, hidden=32)
    elif case == "top-k-too-big":
        write_router(d, names, config={"top_k": 9})
    elif case == "weight-shape":
        write_router(d, names, tensors={"gate.weight": rng.standard_normal((3, 63)).astype(np.float32),
                                        "gate.bias": np.zeros(3, np.float32)})
    elif case == "no-bias":
        write_router(d, names, tensors={"gate.weight": rng.standard_normal((3, 64)).astype(np.float32)})
    elif case == "extra-tensor":
        write_router(d, names, tensors={"gate.weight": np.zeros((3, 64), np.float32),
                                        "gate.bias": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)})
    elif case == "kind":
        write_router(d, names, config={"kind": "task"})
    elif case == "default-top-k-one-adapter":
        _without(write_router(d, names[:1], config={"top_k": 1}), "top_k")
        names = names[:1]
    with pytest.raises(RouterInvalid, match=match) as err:
        registry.register_router(d, "gate", kind="gate", adapters=names)
    assert err.value.code == "router_invalid"
    assert registry.list_routers().items == [] and {b.sha256 for b in registry.storage.list_blobs()} == {
        f.sha256 for m in registry.adapters.all_live() for f in m.files}


def test_delete_of_an_adapter_a_router_uses_is_refused(registry, adapters, tmp_path):
    registry.register_router(write_router(tmp_path / "g", adapters[:2]), "gate", kind="gate", adapters=adapters[:2])
    registry.register_adapter(write_adapter(tmp_path / "a2", seed=99), "r-a")  # r-a has versions 1 and 2
    with pytest.raises(AdapterInUse, match=r"router\(s\) \['gate'\]") as err:
        registry.delete_adapter("r-a")
    assert err.value.status == 409
    assert registry.delete_adapter("r-a", version=1) == [1]  # another version remains
    with pytest.raises(AdapterInUse):
        registry.delete_adapter("r-a", version=2)  # the last one
    assert registry.get_adapter("r-a").version == 2
    assert registry.delete_adapter("r-c") == [1]  # not used by any router
    registry.delete_router("gate")
    assert registry.delete_adapter("r-a") == [2]


def _racing(target, during, done: dict):
    """`target`'s replacement: starts `during` on a thread, gives it 0.5 s, then runs `target`;
    `done` gets the thread, whether it had finished before `target` ran, and its outcome."""
    def run(*args):
        def other():
            try:
                done["outcome"] = during()
            except Exception as e:
                done["outcome"] = e
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)
        done.update(thread=thread, finished_first=not thread.is_alive())
        return target(*args)
    return run


def test_a_router_publish_and_a_delete_of_its_adapter_do_not_interleave(registry, adapters, tmp_path, monkeypatch):
    """A delete of a router's adapter that starts while the router is being published waits
    for it and is then refused; a router registration that starts while its adapter is being
    deleted waits for the delete and is then refused, leaving no router and no blobs."""
    done = {}
    monkeypatch.setattr(registry.routers, "publish",
                        _racing(registry.routers.publish, lambda: registry.delete_adapter("r-a"), done))
    registry.register_router(write_router(tmp_path / "g", adapters[:2]), "gate", kind="gate", adapters=adapters[:2])
    done["thread"].join(15)
    assert not done["finished_first"] and isinstance(done["outcome"], AdapterInUse)
    assert registry.get_adapter("r-a").version == 1
    monkeypatch.undo()

    done = {}
    router = write_router(tmp_path / "g2", adapters[1:])
    deleted = {f.sha256 for f in registry.get_adapter("r-c").files}
    monkeypatch.setattr(registry.adapters, "delete", _racing(registry.adapters.delete, lambda: registry.register_router(
        router, "g2", kind="gate", adapters=adapters[1:]), done))
    assert registry.delete_adapter("r-c") == [1]
    done["thread"].join(15)
    assert not done["finished_first"] and isinstance(done["outcome"], AdapterNotFound)
    assert [m.name for m in registry.list_routers().items] == ["gate"]
    live = {f.sha256 for t in (registry.adapters, registry.routers) for m in t.all_live() for f in m.files}
    assert {b.sha256 for b in registry.storage.list_blobs()} == live | deleted  # (r-c's: reclaimed after the grace)


def test_router_with_a_missing_adapter_names_it(registry, adapters, tmp_path):
    registry.register_router(write_router(tmp_path / "g", adapters[:2]), "gate", kind="gate", adapters=adapters[:2])
    resolver = Resolver(registry, "base")
    assert resolver.resolve("molora:gate").adapters == ("r-a@1", "r-b@1")
    registry.adapters.delete("r-b", None, 0.0)  # as a delete before the in-use rule, or a race, leaves it
    with pytest.raises(ApiError) as err:
        resolver.resolve("molora:gate")
    assert err.value.status == 404 and "'molora:gate'" in err.value.message and "'r-b'" in err.value.message


@pytest.mark.parametrize("text", ["chat@\u00b2", "chat@\u0661", "chat@" + "9" * 5000])
def test_pinned_versions_are_ascii_digits(text):
    with pytest.raises(ApiError) as err:
        split_version(text)
    assert err.value.status == 400 and err.value.param == "model"
    assert split_version("chat@12") == ("chat", 12) and split_version("chat") == ("chat", None)


def test_gate_top_k_over_the_replicas_max_top_k_is_refused(registry, adapters, tmp_path):
    registry.limits = dataclasses.replace(registry.limits, max_top_k=2)
    with pytest.raises(RouterInvalid, match=r"top_k=3 is over the serving replicas' max_top_k=2") as err:
        registry.register_router(write_router(tmp_path / "g3", adapters, config={"top_k": 3}), "gate", kind="gate",
                                 adapters=adapters)
    assert err.value.param == "top_k" and registry.list_routers().items == []
    registry.register_router(write_router(tmp_path / "g2", adapters, config={"top_k": 2}), "gate", kind="gate",
                             adapters=adapters)


def test_a_mixture_over_max_top_k_is_refused_naming_adapters(registry, adapters):
    registry.limits = dataclasses.replace(registry.limits, max_top_k=2)
    resolver = Resolver(registry, "base")
    mixture = [types.SimpleNamespace(name=n, weight=1.0) for n in adapters]
    with pytest.raises(ApiError) as err:
        resolver.resolve("base", mixture)
    assert err.value.status == 400 and err.value.param == "adapters" and "max_top_k=2" in err.value.message
    assert resolver.resolve("base", mixture[:2]).adapters == ("r-a@1", "r-b@1")


def test_a_router_over_more_adapters_than_a_hot_set_holds_is_refused(registry, adapters, tmp_path):
    """It could never be served: registration refuses it, and one registered under a larger
    hot-set is a 400 naming the model at request time, before any replica sees it."""
    registry.register_router(write_router(tmp_path / "g", adapters), "gate", kind="gate", adapters=adapters)
    registry.limits = dataclasses.replace(registry.limits, hot_slots=2)
    with pytest.raises(RouterInvalid, match="hot_slots=2") as err:
        registry.register_router(write_router(tmp_path / "g2", adapters), "g2", kind="gate", adapters=adapters)
    assert err.value.param == "adapters"
    resolver = Resolver(registry, "base")
    with pytest.raises(ApiError) as api:
        resolver.resolve("molora:gate")
    assert api.value.status == 400 and api.value.param == "model" and "hot_slots=2" in api.value.message
    mixture = [types.SimpleNamespace(name=n, weight=1.0) for n in adapters]
    with pytest.raises(ApiError, match="hot_slots=2"):
        resolver.resolve("base", mixture)
