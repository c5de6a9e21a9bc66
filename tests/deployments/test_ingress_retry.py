"""The ingress tries a replica call again, for a moment, while the replicas are momentarily full:
a Serve queue that is full (BackPressureError) and an engine whose own wait queue is full (an
`overloaded` error as the call's first item) alike; past BACKPRESSURE_RETRY_S the refusal is
the answer (429). No Serve app here: a stand-in replica handle."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve.exceptions import BackPressureError

from deployments import ingress
from deployments.errors import ApiError, overloaded

STARTED = {"type": "start"}


class _Call:
    """One replica call's stream: its first item (or the error it raises)."""

    def __init__(self, first):
        self.first = first

    def __aiter__(self):
        return self

    async def __anext__(self):
        if isinstance(self.first, BaseException):
            raise self.first
        return self.first

    def cancel(self) -> None:
        pass


class _Replica:
    """A replica handle that refuses its first `refused` calls, then starts them."""

    def __init__(self, refused: int, refusal):
        self.calls, self.refused, self.refusal = 0, refused, refusal
        self.generate = self

    def remote(self, payload: dict) -> _Call:
        self.calls += 1
        return _Call(self.refusal() if self.calls <= self.refused else STARTED)


REFUSALS = {
    "serve queue full": lambda: BackPressureError(num_queued_requests=1, max_queued_requests=1),
    "engine queue full": lambda: overloaded("the wait queue is full (1 requests); retry later").to_item(),
}


def _ingress(replica: _Replica) -> SimpleNamespace:
    """What `Ingress._start` reads of the ingress: the replica handle and the retry window."""
    return SimpleNamespace(replica=replica, backpressure_retry_s=ingress.BACKPRESSURE_RETRY_S)


def _start(node: SimpleNamespace, payloads: list[dict]):
    return asyncio.run(ingress.Ingress._start(node, payloads))


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_momentarily_full_replica_is_tried_again(refusal):
    node = _ingress(_Replica(3, REFUSALS[refusal]))
    _, firsts = _start(node, [{}, {}])
    assert firsts == [STARTED, STARTED] and node.replica.calls == 5  # 3 refused, then both started


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_past_the_retry_window_the_refusal_is_the_answer(refusal):
    node = _ingress(_Replica(3, REFUSALS[refusal]))
    node.backpressure_retry_s = 0.0
    if refusal == "serve queue full":
        with pytest.raises(ApiError) as err:
            _start(node, [{}])
        assert err.value.status == 429
    else:
        _, firsts = _start(node, [{}])
        assert ApiError.from_item(firsts[0]).status == 429
    assert node.replica.calls == 1
