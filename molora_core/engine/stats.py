"""Engine counters for metrics: queue depth, tokens, hot-set traffic, TTFT and step latency."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of `values`, None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[rank]


@dataclass
class Counters:
    """Running totals, owned by the step thread (read through `Engine.stats()`)."""

    submitted: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    rejected: int = 0  # submit refused (queue full or invalid)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    decode_steps: int = 0
    tokens_by_adapter: dict[str, int] = field(default_factory=dict)  # step tokens per adapter key ("base" = none)
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=4096))
    step_s: deque = field(default_factory=lambda: deque(maxlen=4096))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics exporters and the placement heartbeat."""

    waiting: int
    running: int
    submitted: int
    finished: int
    aborted: int
    failed: int
    rejected: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    decode_steps: int
    graph_steps: int  # decode steps at a fixed shape (CUDA-graph replays on CUDA)
    graph_captures: int  # CUDA graphs captured so far (start-up shapes, then gate routers' shapes)
    tokens_by_adapter: dict[str, int]
    hotset_hits: int
    hotset_host_hits: int
    hotset_cold_loads: int
    hotset_evictions: int
    resident_adapters: dict[str, int]  # hot-set key -> slot
    pinned_adapters: dict[str, int]  # hot-set key -> pins
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    step_p50_s: float | None
    step_p99_s: float | None
    prefix_hits: int = 0  # sequences that started after a shared prompt prefix (engine.kv_slots)
    cached_prompt_tokens: int = 0  # prompt tokens those did not compute
    cached_kv_slots: int = 0  # KV-cache slots now holding a finished sequence's keys and values
