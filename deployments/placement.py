"""Placement controller: runs the store's placement policy and publishes the plan.

Every `interval_s` the leader reads live replicas, demand and co-usage from the registry
(`ReplicaDirectory.compute_placement`, i.e. `adapter_store.placement.plan_placement`), publishes
the plan when it changed, and decays demand so the plan follows recent traffic. Replicas read
their assignment on each heartbeat and prefetch it into free slots; the request router then
finds those adapters hot.

It runs as a thread inside each ingress replica; a Redis lease (SET NX PX) makes exactly one of
them the leader at a time, and another takes over within one lease when the leader dies.
"""

from __future__ import annotations

import logging
import threading
import uuid

from adapter_store import Registry

log = logging.getLogger("ray.serve")


class PlacementController:
    def __init__(self, registry: Registry, namespace: str, interval_s: float = 5.0, decay: float = 0.8):
        self.registry = registry
        self.interval_s = interval_s
        self.decay = decay
        self.lease_key = f"{namespace}:serve:placement-leader"
        self.me = uuid.uuid4().hex
        self.last_plan: dict[str, list[str]] | None = None
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="molora-placement", daemon=True)

    def start(self) -> "PlacementController":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _lead(self) -> bool:
        lease_ms = int(self.interval_s * 3000)
        client = self.registry.client
        if client.set(self.lease_key, self.me, nx=True, px=lease_ms):
            return True
        if client.get(self.lease_key) == self.me:
            client.pexpire(self.lease_key, lease_ms)
            return True
        return False

    def run_once(self) -> dict[str, list[str]] | None:
        """One round if this controller leads; returns the plan it published (None if unchanged)."""
        if not self._lead():
            return None
        plan = self.registry.replicas.compute_placement()
        self.registry.replicas.decay(self.decay)
        self.rounds += 1
        if plan == self.last_plan:
            return None
        version = self.registry.replicas.publish_placement(plan)
        self.last_plan = plan
        log.info("placement %d: %s", version, plan)
        return plan

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # Redis down: try again next round
                log.warning("placement round failed: %r", exc)
