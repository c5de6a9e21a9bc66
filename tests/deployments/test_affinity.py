"""With two replicas, requests for an adapter go where it is hot."""

from __future__ import annotations

import time
from collections import Counter


def _replica_of(client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": "x = ", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["x-molora-replica"]


def test_two_replicas_are_up(served):
    deadline = time.time() + 30
    while time.time() < deadline and len(served.registry.replicas.live()) < 2:
        time.sleep(0.5)
    assert len(served.registry.replicas.live()) == 2


def test_repeated_requests_land_where_the_adapter_is_hot(served):
    with served.client() as c:
        first = _replica_of(c, "multilingual")
        landed = Counter(_replica_of(c, "multilingual") for _ in range(8))
        time.sleep(1.5)  # a heartbeat reports the hot-set
    assert landed == Counter({first: 8})
    hot = {s.replica_id: s.hot_set for s in served.registry.replicas.live()}
    assert "multilingual@1" in hot[first]
