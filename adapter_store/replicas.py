"""Replica membership, hot-set reports, demand counters and the published placement.

A model replica calls ``heartbeat`` every few seconds with its capacity, its hot-set and the
demand it saw since the last beat (``UsageCounter.drain()``). Its record expires after the TTL, so
a replica that dies drops out of ``live()`` on its own. A placement controller reads ``live()``,
``demand()`` and ``co_usage()``, runs the placement policy and ``publish_placement``; replicas
read ``assignment(replica_id)`` (or follow the ``placement.updated`` event) and prefetch.

Keys (``P`` the namespace): ``P:replica:<id>`` (JSON, TTL), ``P:replicas`` (zset id -> expiry),
``P:demand`` (hash adapter -> count), ``P:couse`` (hash "a|b" -> count), ``P:placement`` (JSON).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import redis
from pydantic import BaseModel, Field

from .events import EventLog
from .placement import ReplicaCapacity, plan_placement
from .redis_conn import redis_errors

_SCALE = """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = tonumber(all[i + 1]) * tonumber(ARGV[1])
  if v < tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], all[i])
  else redis.call('HSET', KEYS[1], all[i], tostring(v)) end
end
return #all / 2
"""


class ReplicaHeartbeat(BaseModel):
    """What a model replica reports each beat."""

    replica_id: str = Field(min_length=1, max_length=200, description="Stable id of the replica (e.g. Ray actor id).")
    capacity: int = Field(ge=0, le=1_000_000, description="How many adapters the replica can hold (slots + host tier).")
    hot_set: list[str] = Field(default_factory=list, description="Adapters resident now, 'name' or 'name@version'.")
    address: str = Field("", max_length=500, description="Where the request router reaches it (informational).")
    load: float = Field(0.0, ge=0, description="Queue depth or any load figure the request router compares.")
    demand: dict[str, float] = Field(default_factory=dict, description="Adapter -> requests since the last beat.")
    co_usage: dict[str, float] = Field(
        default_factory=dict, description="'a|b' (a < b) -> requests that used both since the last beat."
    )


@dataclass(frozen=True)
class ReplicaState:
    replica_id: str
    capacity: int
    hot_set: list[str]
    address: str
    load: float
    updated_at: float


@dataclass
class UsageCounter:
    """Replica-side accumulator of demand between heartbeats (not thread-safe; one per loop)."""

    demand: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)

    def observe(self, adapters: list[str]) -> None:
        """Record one request that used ``adapters`` (a mixture or router set counts as co-use)."""
        names = sorted(set(adapters))
        self.demand.update(names)
        self.pairs.update(f"{a}|{b}" for a, b in itertools.combinations(names, 2))

    def drain(self) -> tuple[dict[str, float], dict[str, float]]:
        out = dict(self.demand), dict(self.pairs)
        self.demand.clear()
        self.pairs.clear()
        return out


class ReplicaDirectory:
    def __init__(self, client: redis.Redis, events: EventLog, *, namespace: str = "molora", ttl_s: float = 15.0):
        self.client = client
        self.events = events
        self.ns = namespace
        self.ttl_s = ttl_s
        self._scale = client.register_script(_SCALE)

    def _rk(self, replica_id: str) -> str:
        return f"{self.ns}:replica:{replica_id}"

    def heartbeat(self, hb: ReplicaHeartbeat) -> None:
        now = time.time()
        state = {
            "replica_id": hb.replica_id, "capacity": hb.capacity, "hot_set": hb.hot_set,
            "address": hb.address, "load": hb.load, "updated_at": now,
        }
        with redis_errors(f"heartbeat of replica {hb.replica_id!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._rk(hb.replica_id), json.dumps(state), px=int(self.ttl_s * 1000))
            pipe.zadd(f"{self.ns}:replicas", {hb.replica_id: now + self.ttl_s})
            for name, n in hb.demand.items():
                pipe.hincrbyfloat(f"{self.ns}:demand", name, n)
            for pair, n in hb.co_usage.items():
                pipe.hincrbyfloat(f"{self.ns}:couse", pair, n)
            pipe.execute()

    def leave(self, replica_id: str) -> None:
        with redis_errors(f"removing replica {replica_id!r}"):
            self.client.delete(self._rk(replica_id))
            self.client.zrem(f"{self.ns}:replicas", replica_id)

    def live(self) -> list[ReplicaState]:
        """Replicas whose last heartbeat is within the TTL, sorted by id."""
        key = f"{self.ns}:replicas"
        with redis_errors("listing replicas"):
            self.client.zremrangebyscore(key, "-inf", time.time())
            ids = self.client.zrange(key, 0, -1)
            raw = self.client.mget([self._rk(i) for i in ids]) if ids else []
        out = [ReplicaState(**json.loads(r)) for r in raw if r]
        return sorted(out, key=lambda s: s.replica_id)

    def demand(self) -> dict[str, float]:
        with redis_errors("reading demand"):
            return {k: float(v) for k, v in self.client.hgetall(f"{self.ns}:demand").items()}

    def co_usage(self) -> dict[tuple[str, str], float]:
        with redis_errors("reading co-usage"):
            raw = self.client.hgetall(f"{self.ns}:couse")
        out = {}
        for k, v in raw.items():
            a, _, b = k.partition("|")
            if a and b:
                out[(min(a, b), max(a, b))] = float(v)
        return out

    def decay(self, factor: float = 0.5, drop_below: float = 0.01) -> None:
        """Multiply demand and co-usage by ``factor`` (so they track recent use); drop tiny ones."""
        with redis_errors("decaying demand"):
            for key in (f"{self.ns}:demand", f"{self.ns}:couse"):
                self._scale(keys=[key], args=[factor, drop_below])

    def compute_placement(self) -> dict[str, list[str]]:
        reps = [ReplicaCapacity(s.replica_id, s.capacity) for s in self.live()]
        return plan_placement(reps, self.demand(), self.co_usage())

    def publish_placement(self, plan: dict[str, list[str]]) -> int:
        """Store the plan and emit ``placement.updated``; returns the placement version."""
        with redis_errors("publishing placement"):
            version = int(self.client.incr(f"{self.ns}:placement:seq"))
            self.client.set(f"{self.ns}:placement", json.dumps({"version": version, "plan": plan}))
        self.events.publish("placement.updated", "placement", version=version)
        return version

    def assignment(self, replica_id: str) -> list[str]:
        """Adapters the current placement gives ``replica_id`` (empty when it has none)."""
        with redis_errors("reading placement"):
            raw = self.client.get(f"{self.ns}:placement")
        return json.loads(raw)["plan"].get(replica_id, []) if raw else []
