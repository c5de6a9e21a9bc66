"""Placement policy: which adapters each replica should hold.

Pure and deterministic (same inputs, same plan, whatever the input order). Two steps:

1. Copies. Every adapter with demand gets one copy while slots last (most demanded first); the
   remaining slots go, one at a time, to the adapter with the highest demand per copy (D'Hondt
   apportionment), never more copies than replicas. Popular adapters end up on more replicas.
2. Assignment. Adapters are placed most demanded first, each followed by the adapters co-used
   with it (breadth-first, strongest first). Each copy goes to the replica with free
   capacity that has the highest co-usage affinity (sum of co-usage weights with adapters already
   there), then the lowest demand load per slot, then the most free slots, then the smallest id.
   Adapters used together therefore land together, and load spreads where there is no affinity.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaCapacity:
    replica_id: str
    capacity: int  # adapters (hot-set slots plus host tier) the replica can hold


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def plan_copies(demand: Mapping[str, float], total_slots: int, n_replicas: int) -> dict[str, int]:
    """Copies per adapter: one each (by demand) while slots last, then D'Hondt by demand."""
    order = sorted((a for a, d in demand.items() if d > 0), key=lambda a: (-demand[a], a))
    copies: dict[str, int] = {}
    slots = total_slots
    for a in order:
        if slots == 0:
            break
        copies[a] = 1
        slots -= 1
    heap = [(-demand[a] / 2.0, a) for a in copies if n_replicas > 1]
    heapq.heapify(heap)
    while slots > 0 and heap:
        _, a = heapq.heappop(heap)
        copies[a] += 1
        slots -= 1
        if copies[a] < n_replicas:
            heapq.heappush(heap, (-demand[a] / (copies[a] + 1), a))
    return copies


def _placement_order(
    copies: Mapping[str, int], demand: Mapping[str, float], neighbours: Mapping[str, Mapping[str, float]]
) -> list[str]:
    """Most demanded first, but each adapter is followed by its co-used neighbours (strongest
    first, breadth-first), so a group is placed while its replicas still have room."""
    order: list[str] = []
    seen: set[str] = set()
    for root in sorted(copies, key=lambda a: (-demand[a], a)):
        if root in seen:
            continue
        seen.add(root)
        queue = [root]
        while queue:
            a = queue.pop(0)
            order.append(a)
            nbrs = sorted(neighbours.get(a, {}).items(), key=lambda kv: (-kv[1], kv[0]))
            for b, _ in nbrs:
                if b in copies and b not in seen:
                    seen.add(b)
                    queue.append(b)
    return order


def plan_placement(
    replicas: list[ReplicaCapacity],
    demand: Mapping[str, float],
    co_usage: Mapping[tuple[str, str], float] | None = None,
) -> dict[str, list[str]]:
    """Adapters each replica should hold: replica_id -> sorted adapter names.

    ``demand``: adapter -> recent request count (or any non-negative weight). ``co_usage``:
    (adapter, adapter) -> how often the two were used in the same request (order-free).
    """
    reps = sorted(replicas, key=lambda r: r.replica_id)
    if not reps:
        return {}
    copies = plan_copies(demand, sum(max(0, r.capacity) for r in reps), len(reps))

    neighbours: dict[str, dict[str, float]] = defaultdict(dict)
    for (a, b), w in (co_usage or {}).items():
        if a != b and w > 0:
            a, b = _pair(a, b)
            neighbours[a][b] = neighbours[a].get(b, 0.0) + w
            neighbours[b][a] = neighbours[b].get(a, 0.0) + w

    free = {r.replica_id: max(0, r.capacity) for r in reps}
    cap = {r.replica_id: max(1, r.capacity) for r in reps}
    load = {r.replica_id: 0.0 for r in reps}
    held: dict[str, set[str]] = {r.replica_id: set() for r in reps}
    # affinity[replica][adapter]: co-usage weight between adapter and what replica already holds
    affinity: dict[str, dict[str, float]] = {r.replica_id: defaultdict(float) for r in reps}

    for a in _placement_order(copies, demand, neighbours):
        n, share = copies[a], demand[a] / copies[a]
        for _ in range(n):
            best = None
            for rid in free:
                if free[rid] == 0 or a in held[rid]:
                    continue
                key = (-affinity[rid][a], load[rid] / cap[rid], -free[rid], rid)
                if best is None or key < best[0]:
                    best = (key, rid)
            if best is None:
                break
            rid = best[1]
            held[rid].add(a)
            free[rid] -= 1
            load[rid] += share
            for b, w in neighbours.get(a, {}).items():
                affinity[rid][b] += w
    return {rid: sorted(h) for rid, h in held.items()}
