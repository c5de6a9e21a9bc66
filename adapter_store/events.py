"""Registry events: live through pub/sub, durable through a stream.

Every registration, deletion and placement change appends one event to the stream ``P:events``
and publishes the same event on the channel ``P:events``. A replica follows the channel while it
is up, remembers the id of the last event it handled, and after a restart catches up with
``EventLog.read(after=last_id)`` before it subscribes again (events carry their stream id, so the
replica can drop duplicates seen on both paths).

Event types: ``adapter.registered``, ``adapter.deleted``, ``router.registered``,
``router.deleted``, ``placement.updated``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from .redis_conn import redis_errors


@dataclass(frozen=True)
class Event:
    id: str          # stream id, e.g. "1712345678901-0"; ordered
    type: str        # e.g. "adapter.registered"
    kind: str        # "adapter" | "router" | "placement"
    name: str        # artifact name ("" for placement events)
    version: int     # artifact version (placement: placement version)
    sha256: str      # content id for registrations, "" otherwise
    ts: float        # unix time the registry wrote it

    @classmethod
    def from_fields(cls, event_id: str, fields: dict) -> "Event":
        return cls(
            id=event_id,
            type=fields.get("type", ""),
            kind=fields.get("kind", ""),
            name=fields.get("name", ""),
            version=int(fields.get("version") or 0),
            sha256=fields.get("sha256", ""),
            ts=float(fields.get("ts") or 0.0),
        )


class Subscription:
    """Live events from pub/sub. Call ``get`` in a loop; ``close`` when done."""

    def __init__(self, pubsub: redis.client.PubSub):
        self._pubsub = pubsub

    def get(self, timeout_s: float = 1.0) -> Event | None:
        """The next event, or None if none arrived within ``timeout_s``."""
        with redis_errors("receiving events"):
            deadline = time.monotonic() + timeout_s
            while True:
                left = max(0.0, deadline - time.monotonic())
                msg = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if msg is not None and msg.get("type") == "message":
                    data = json.loads(msg["data"])
                    return Event.from_fields(data.get("id", ""), data)
                if time.monotonic() >= deadline:
                    return None

    def close(self) -> None:
        self._pubsub.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventLog:
    def __init__(self, client: redis.Redis, *, namespace: str = "molora", maxlen: int = 100_000):
        self.client = client
        self.key = f"{namespace}:events"
        self.maxlen = maxlen

    def publish(self, type: str, kind: str, name: str = "", version: int = 0, sha256: str = "") -> str:
        """Append and publish an event that no Lua script emits (placement updates)."""
        ts = repr(time.time())
        fields = {"type": type, "kind": kind, "name": name, "version": version, "sha256": sha256, "ts": ts}
        with redis_errors(f"publishing event {type}"):
            event_id = self.client.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
            self.client.publish(self.key, json.dumps({"id": event_id, **fields}))
        return event_id

    def read(self, after: str = "0-0", count: int = 1000, block_ms: int | None = None) -> list[Event]:
        """Events strictly after stream id ``after`` (oldest first), at most ``count``.
        With ``block_ms``, wait up to that long for the first one."""
        with redis_errors("reading events"):
            out = self.client.xread({self.key: after}, count=count, block=block_ms)
        if not out:
            return []
        _, entries = out[0]
        return [Event.from_fields(i, f) for i, f in entries]

    def last_id(self) -> str:
        """Id of the newest event ("0-0" when there is none): start point for a fresh follower."""
        with redis_errors("reading events"):
            last = self.client.xrevrange(self.key, count=1)
        return last[0][0] if last else "0-0"

    def subscribe(self) -> Subscription:
        with redis_errors("subscribing to events"):
            pubsub = self.client.pubsub()
            pubsub.subscribe(self.key)
        return Subscription(pubsub)
