"""Replicas follow registry events: a new version or a delete makes the old key leave its slot;
the placement controller publishes a plan from the replicas' demand."""

from __future__ import annotations

import time

from adapter_store import BaseModelSignature, ReplicaHeartbeat
from adapter_store.blob_cache import BlobCache
from adapter_store.redis_conn import connect
from adapter_store.registry import Registry
from adapter_store.storage_local import LocalStorage
from deployments.placement import PlacementController


def _upload(client, served, name: str, source: str):
    src = served.demo / "adapters" / source
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(src.iterdir())]
    r = client.post("/v1/adapters", data={"name": name}, files=files)
    assert r.status_code == 201, r.text
    return r.json()["version"]


def _complete(client, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": "x = ", "max_tokens": 2, "temperature": 0})


def _hot_sets(served) -> dict[str, list[str]]:
    return {s.replica_id: list(s.hot_set) for s in served.registry.replicas.live()}


def _wait(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return predicate()


def test_new_version_replaces_the_old_key_and_delete_frees_it(served):
    with served.client() as c:
        assert _upload(c, served, "evolving", "code") == 1
        r = _complete(c, "evolving")
        assert r.status_code == 200, r.text
        holder = r.headers["x-molora-replica"]
        assert _wait(lambda: "evolving@1" in _hot_sets(served).get(holder, []))

        assert _upload(c, served, "evolving", "chat") == 2  # new content: a new version
        assert _wait(lambda: not any("evolving@1" in hot for hot in _hot_sets(served).values())), _hot_sets(served)
        r = _complete(c, "evolving")
        assert r.status_code == 200, r.text
        assert _wait(lambda: any("evolving@2" in hot for hot in _hot_sets(served).values())), _hot_sets(served)

        assert c.delete("/v1/adapters/evolving").status_code in (200, 204)
        assert _wait(lambda: not any(k.startswith("evolving@") for hot in _hot_sets(served).values() for k in hot))
        r = _complete(c, "evolving")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_live_placement_controller_publishes_a_plan_for_demanded_adapters(served):
    with served.client() as c:
        for _ in range(3):
            assert _complete(c, "math").status_code == 200
    live = {s.replica_id for s in served.registry.replicas.live()}

    def planned():
        assigned = {rid: served.registry.replicas.assignment(rid) for rid in live}
        return any("math@1" in keys for keys in assigned.values())

    assert _wait(planned), "the ingress's controller publishes a placement that holds math@1"


def test_placement_controller_leads_alone_and_publishes_only_changes(served, tmp_path):
    """Against the app's Valkey, in a namespace of its own, with two synthetic replicas."""
    client = connect(served.cfg.redis_url)
    signature = BaseModelSignature.from_hf_config(served.demo / "model")
    registry = Registry(client, LocalStorage((tmp_path / "s").as_uri()), BlobCache(tmp_path / "c", 1 << 20), signature,
                        staging_dir=tmp_path / "staging", namespace="placement-test")
    try:
        for rid, demand in (("r1", {"a@1": 30, "b@1": 5}), ("r2", {"a@1": 30, "c@1": 8})):
            registry.replicas.heartbeat(ReplicaHeartbeat(
                replica_id=rid, capacity=2, hot_set=[], address=rid, load=0.0, demand=demand, co_usage={},
            ))
        leader = PlacementController(registry, "placement-test", interval_s=5.0)
        other = PlacementController(registry, "placement-test", interval_s=5.0)
        plan = leader.run_once()
        assert plan is not None and set(plan) == {"r1", "r2"}
        assert other.run_once() is None, "a second controller does not lead while the lease holds"
        placed = [k for keys in plan.values() for k in keys]
        assert placed.count("a@1") == 2, f"the most demanded adapter goes on both replicas: {plan}"
        assert registry.replicas.assignment("r1") == plan["r1"]
        assert leader.run_once() is None, "an unchanged plan is not published again"
    finally:
        client.close()
