"""AdapterAffinityRouter's ranking, on stand-in replicas (no cluster needed)."""

import time
from types import SimpleNamespace

from ray.serve._private.request_router.common import ReplicaQueueLengthCache

from deployments.request_router import AdapterAffinityRouter, request_adapters, request_prefix_keys, two_choices


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


def test_a_report_after_the_routing_replaces_it():
    """A replica's report from after an adapter was sent there is the truth about it (it may have
    evicted the adapter since); a report from before, or none, leaves the routing counting."""
    r = _router()
    pending = SimpleNamespace(args=[{"routing": {"adapters": ["x@1"]}}], kwargs={})
    r.on_request_routed(pending, "a", None)
    a, b = _replica("a", []), _replica("b", ["y@1"])
    for at, held in ((None, True), (time.time() - 10, True), (time.time(), True), (time.time() + 2, False)):
        a.routing_stats = {"hot_set": [], "queue": 0, **({} if at is None else {"at": at})}
        assert (r.rank([a, b], ["x@1"])[0] == [a]) == held, at


def test_a_tie_between_two_replicas_goes_either_way():
    a, b = _replica("a", []), _replica("b", [])
    orders = {tuple(x.replica_id for x in two_choices([a, b])) for _ in range(64)}
    assert orders == {("a", "b"), ("b", "a")}
    assert two_choices([a]) == [a]


def test_imbalance_puts_load_first():
    r = _router(imbalance_threshold=4)
    a, b = _replica("a", ["x@1"], queue=20), _replica("b", [], queue=0)
    assert r.rank([a, b], ["x@1"])[0] == [a, b]


def _generate(prompt=None, messages=None, adapters=("x@1",)):
    payload = {"routing": {"kind": "adapter", "adapters": list(adapters)}, "prompt": prompt}
    if messages is not None:
        payload["messages"] = messages
    return SimpleNamespace(args=[payload], kwargs={})


SYSTEM = "You are a careful assistant. Answer in one line, cite nothing, and say so when unsure. " * 3


def test_a_prompt_that_begins_as_a_routed_one_goes_where_that_one_went():
    """Prefix affinity: the replica holding a prompt's cached keys and values comes first, ahead
    of adapter holders; the longest known prefix decides, and a block last went where it was
    routed last."""
    r = _router()
    a, b, c = _replica("a", ["x@1"]), _replica("b", []), _replica("c", [])
    r.on_request_routed(_generate(SYSTEM + "Q1? A1. Q2? " + "more " * 30), "c", None)
    r.on_request_routed(_generate(SYSTEM + "Q1?"), "b", None)  # the system prompt's blocks: b's now
    assert r.rank_with_prefix([a, b, c], ["x@1"], request_prefix_keys(_generate(SYSTEM + "Q9?")))[0] == [b]
    follow_up = _generate(SYSTEM + "Q1? A1. Q2? " + "more " * 30 + "Q3?")
    assert r.rank_with_prefix([a, b, c], ["x@1"], request_prefix_keys(follow_up))[0] == [c]
    # Another routing, a prompt shorter than a block, or a fresh prompt: adapter affinity only.
    for other in (_generate(SYSTEM + "Q1?", adapters=("y@1",)), _generate("hi"), _generate("Z" * 500)):
        assert r.rank_with_prefix([a, b, c], ["x@1"], request_prefix_keys(other)) == r.rank([a, b, c], ["x@1"])
    # A holder whose queue is much longer than the shortest loses its turn.
    b.routing_stats = {"hot_set": [], "queue": 20}
    keys = request_prefix_keys(_generate(SYSTEM + "Q9?"))
    assert r.rank_with_prefix([a, b, c], ["x@1"], keys) == r.rank([a, b, c], ["x@1"])


def test_chat_turns_share_prefix_keys_and_old_prefixes_expire():
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q1?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "A1."}, {"role": "user", "content": "Q2?"}]
    k1, k2 = request_prefix_keys(_generate(messages=turn1)), request_prefix_keys(_generate(messages=turn2))
    assert len(k1) >= 3 and k2[: len(k1)] == k1  # every whole block of turn 1 begins turn 2 as well
    r = _router(prefix_memory_s=0.0)
    a, b = _replica("a", []), _replica("b", [])
    r.on_request_routed(_generate(messages=turn1), "b", None)
    assert r.prefix_holder([a, b], k2) is None
