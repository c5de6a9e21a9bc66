"""Adapter-affinity request router: send a request where its adapters are already hot.

A Ray Serve `RequestRouter` for the ModelReplica deployment. For each request it reads the
hot-set keys the ingress resolved (`payload["routing"]["adapters"]`) and ranks replicas:

1. replicas that hold *all* of them, then those that hold the *most* of them (a partial hit still
   saves cold loads), each rank narrowed to two random picks (power of two choices: the base
   class then takes the shorter queue of the two among those that accept);
2. every replica, power of two choices, as the last rank.

What a replica "holds" is the union of its last routing stats (`record_routing_stats`: its
resident hot-set when it reported, refreshed every `request_routing_stats_period_s`) and the
adapters this router sent it since shortly before that report (`report_grace_s`), which covers
the gap until its next one; an adapter sent before that is in the report or was evicted since.
Without stats (a new replica, a failed report) the adapters sent in the last `memory_s` seconds
count, so routing falls back to plain power of two choices where there are none. When the best
holder's queue is longer than the shortest queue by more than `imbalance_threshold`, load wins
and the last rank goes first.

Prefix affinity comes before both: replicas keep finished requests' prompt keys and values for
reuse (the engine's prefix caching), so a request whose prompt begins as one this router sent
in the last `prefix_memory_s` seconds, on the same routing, goes first to that replica (a chat's
next turn, requests with one system prompt), unless its queue is longer than the shortest by
more than `imbalance_threshold`. Prompts are keyed by chained hashes of whole blocks of
`PREFIX_BLOCK` characters of their text (the chat messages as JSON), seeded with the routing,
and the longest known block chain wins.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


def generate_payload(pending_request: PendingRequest | None) -> dict | None:
    """The ModelReplica.generate payload among a request's arguments (the dict with a `routing`
    dict), or None for other calls."""
    if pending_request is None:
        return None
    for value in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(value, dict) and isinstance(value.get("routing"), dict):
            return value
    return None


def request_adapters(pending_request: PendingRequest | None) -> list[str]:
    """The hot-set keys a ModelReplica.generate payload names ([] for base or unknown calls)."""
    payload = generate_payload(pending_request)
    return [] if payload is None else [str(a) for a in payload["routing"].get("adapters") or []]


PREFIX_BLOCK = 64  # characters of prompt text per prefix-hash block
PREFIX_BLOCKS = 64  # blocks hashed at most (the first 4096 characters)
PREFIX_KEYS = 1 << 16  # prefix keys remembered (least recently routed out first)


def request_prefix_keys(pending_request: PendingRequest | None) -> list[bytes]:
    """Chained hashes of the whole PREFIX_BLOCK-character blocks of a ModelReplica.generate
    payload's prompt text (a completion's prompt, or the chat messages as JSON), seeded with its
    routing: key i stands for the prompt's first (i + 1) blocks. [] without a prompt or routing."""
    payload = generate_payload(pending_request)
    prompt = None if payload is None else payload.get("messages", payload.get("prompt"))
    if prompt is None:
        return []
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    h = hashlib.blake2b(json.dumps(payload["routing"], sort_keys=True).encode(), digest_size=16)
    keys = []
    for start in range(0, min(len(text), PREFIX_BLOCK * PREFIX_BLOCKS) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        h.update(text[start : start + PREFIX_BLOCK].encode())
        keys.append(h.digest())
    return keys


def two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two random replicas, in random order: of two with equal queues the base class takes the
    first, so an unshuffled pair sent every tie to the same one."""
    return random.sample(replicas, min(2, len(replicas)))


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 8, memory_s: float = 30.0, prefix_memory_s: float = 600.0,
                         report_grace_s: float = 1.0, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.memory_s, self.prefix_memory_s, self.report_grace_s = memory_s, prefix_memory_s, report_grace_s
        self._recent: dict[ReplicaID, dict[str, float]] = {}  # replica -> key -> last time (wall) routed there
        # prefix key -> (replica it was last routed to, when), least recently routed first
        self._prefixes: OrderedDict[bytes, tuple[ReplicaID, float]] = OrderedDict()

    def prefix_holder(self, candidates: list[RunningReplica], keys: list[bytes]) -> RunningReplica | None:
        """The candidate that was sent the longest of these prefixes within prefix_memory_s, if any."""
        now, by_id = time.monotonic(), {r.replica_id: r for r in candidates}
        for key in reversed(keys):
            entry = self._prefixes.get(key)
            if entry is not None and now - entry[1] < self.prefix_memory_s and entry[0] in by_id:
                return by_id[entry[0]]
        return None

    def held(self, replica: RunningReplica, now: float) -> set[str]:
        """now: wall-clock seconds (the replicas' reports carry wall-clock times)."""
        stats = replica.routing_stats or {}
        hot = set(stats.get("hot_set") or [])
        at = stats.get("at")
        since = now - self.memory_s if at is None else max(now - self.memory_s, at - self.report_grace_s)
        recent = self._recent.get(replica.replica_id, {})
        return hot | {k for k, t in recent.items() if t > since}

    def queue_len(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return cached
        return int((replica.routing_stats or {}).get("queue", 0))

    def rank(self, candidates: list[RunningReplica], wanted: list[str]) -> list[list[RunningReplica]]:
        """Ranks of replicas, most preferred first (without the random narrowing)."""
        if not wanted or len(candidates) <= 1:
            return [candidates]
        now = time.time()
        want = set(wanted)
        groups: dict[int, list[RunningReplica]] = {}
        for r in candidates:
            groups.setdefault(len(want & self.held(r, now)), []).append(r)
        ranks = [groups[score] for score in sorted(groups, reverse=True) if score > 0]
        if ranks:
            best = min(self.queue_len(r) for r in ranks[0])
            shortest = min(self.queue_len(r) for r in candidates)
            if best - shortest > self.imbalance_threshold:
                return [candidates] + ranks
        return ranks + [candidates]

    def rank_with_prefix(self, candidates: list[RunningReplica], wanted: list[str],
                         keys: list[bytes]) -> list[list[RunningReplica]]:
        """`rank`, with the replica that holds the longest of the prompt's prefixes first where
        its queue is not too long."""
        ranks = self.rank(candidates, wanted)
        holder = self.prefix_holder(candidates, keys) if len(candidates) > 1 else None
        if holder is not None:
            shortest = min(self.queue_len(r) for r in candidates)
            if self.queue_len(holder) - shortest <= self.imbalance_threshold:
                return [[holder]] + ranks
        return ranks

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranks = self.rank_with_prefix(list(candidate_replicas), request_adapters(pending_request),
                                      request_prefix_keys(pending_request))
        if pending_request is not None:
            # Our last rank is every replica: when all of them are busy, back off before retrying.
            pending_request.routing_context.should_backoff = True
        return [two_choices(r) for r in ranks if r]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        now = time.monotonic()
        for key in request_prefix_keys(pending_request):
            self._prefixes[key] = (replica_id, now)
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > PREFIX_KEYS:
            self._prefixes.popitem(last=False)
        wanted = request_adapters(pending_request)
        if not wanted:
            return
        recent, routed = self._recent.setdefault(replica_id, {}), time.time()
        for key in wanted:
            recent[key] = routed
        if len(recent) > 4096:  # bound the memory: keep the newest half
            for key, _ in sorted(recent.items(), key=lambda kv: kv[1])[: len(recent) // 2]:
                del recent[key]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._recent.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)
