"""Replica membership, demand counters and placement publishing on the real Valkey server."""

import time

from adapter_store.replicas import ReplicaDirectory, ReplicaHeartbeat, UsageCounter


def test_heartbeat_membership_and_ttl(registry):
    reps = ReplicaDirectory(registry.client, registry.events, namespace=registry.adapters.ns, ttl_s=1.0)
    reps.heartbeat(ReplicaHeartbeat(replica_id="r1", capacity=8, hot_set=["a", "b@2"], load=1.5))
    reps.heartbeat(ReplicaHeartbeat(replica_id="r2", capacity=4))
    live = reps.live()
    assert [s.replica_id for s in live] == ["r1", "r2"]
    assert live[0].hot_set == ["a", "b@2"] and live[0].capacity == 8 and live[0].load == 1.5
    time.sleep(0.6)
    reps.heartbeat(ReplicaHeartbeat(replica_id="r2", capacity=4))
    time.sleep(0.6)
    assert [s.replica_id for s in reps.live()] == ["r2"]  # r1 missed its beat
    reps.leave("r2")
    assert reps.live() == []


def test_demand_and_co_usage_counters(registry):
    reps = registry.replicas
    counter = UsageCounter()
    counter.observe(["math", "code"])
    counter.observe(["math"])
    counter.observe(["code", "math", "code"])
    demand, pairs = counter.drain()
    assert demand == {"code": 2, "math": 3} and pairs == {"code|math": 2}
    assert counter.drain() == ({}, {})
    reps.heartbeat(ReplicaHeartbeat(replica_id="r1", capacity=4, demand=demand, co_usage=pairs))
    reps.heartbeat(ReplicaHeartbeat(replica_id="r2", capacity=4, demand={"math": 1}))
    assert reps.demand() == {"code": 2.0, "math": 4.0}
    assert reps.co_usage() == {("code", "math"): 2.0}
    reps.decay(0.5, drop_below=1.01)
    assert reps.demand() == {"math": 2.0}


def test_placement_publish_and_assignment(registry):
    reps = registry.replicas
    reps.heartbeat(ReplicaHeartbeat(replica_id="r1", capacity=3, demand={"a": 10, "b": 5, "c": 1, "d": 1, "e": 1},
                                    co_usage={"b|c": 3}))
    reps.heartbeat(ReplicaHeartbeat(replica_id="r2", capacity=3))
    start = registry.events.last_id()
    plan = reps.compute_placement()
    assert sorted(sum(plan.values(), [])) == ["a", "a", "b", "c", "d", "e"]
    assert any({"b", "c"} <= set(v) for v in plan.values())  # co-used adapters together
    version = reps.publish_placement(plan)
    assert reps.assignment("r1") == plan["r1"] and reps.assignment("nobody") == []
    events = registry.events.read(after=start)
    assert [(e.type, e.version) for e in events] == [("placement.updated", version)]
