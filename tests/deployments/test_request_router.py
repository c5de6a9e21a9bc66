"""AdapterAffinityRouter's ranking, on stand-in replicas (no cluster needed)."""

from types import SimpleNamespace

from ray.serve._private.request_router.common import ReplicaQueueLengthCache

from deployments.request_router import AdapterAffinityRouter, request_adapters


def _router(**kw) -> AdapterAffinityRouter:
    router = object.__new__(AdapterAffinityRouter)  # the base __init__ needs a live deployment
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    router.initialize_state(**kw)
    return router


def _replica(rid, hot=None, queue=0):
    stats = None if hot is None else {"hot_set": hot, "queue": queue}
    return SimpleNamespace(replica_id=rid, routing_stats=stats)


def test_prefers_all_then_most_then_everyone():
    r = _router()
    a, b, c = _replica("a", ["x@1", "y@1"]), _replica("b", ["x@1"]), _replica("c", None)
    ranks = r.rank([a, b, c], ["x@1", "y@1"])
    assert [[x.replica_id for x in rank] for rank in ranks] == [["a"], ["b"], ["a", "b", "c"]]


def test_no_adapters_or_no_stats_is_plain_load_balancing():
    r = _router()
    reps = [_replica("a"), _replica("b")]
    assert r.rank(reps, []) == [reps]
    assert r.rank(reps, ["x@1"]) == [reps]


def test_recently_routed_counts_as_held():
    r = _router()
    a, b = _replica("a", []), _replica("b", [])
    pending = SimpleNamespace(args=[{"routing": {"adapters": ["x@1"]}}], kwargs={})
    assert request_adapters(pending) == ["x@1"]
    r.on_request_routed(pending, "b", None)
    assert r.rank([a, b], ["x@1"])[0] == [b]


def test_imbalance_puts_load_first():
    r = _router(imbalance_threshold=4)
    a, b = _replica("a", ["x@1"], queue=20), _replica("b", [], queue=0)
    assert r.rank([a, b], ["x@1"])[0] == [a, b]
