"""`/metrics` in Prometheus text format (exposition format 0.0.4).

Two sources: what the ingress measures itself (requests by route and status, time to first token,
inter-token latency and whole-request latency as seen at the HTTP edge, prompt and generated
tokens, tokens/s over a sliding window) and what each model replica publishes with its heartbeat
(queue depth, running requests, requests by outcome, hot-set hits / misses / evictions, adapter
load latency, tokens per adapter), labelled by replica.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WINDOW_S = 10.0


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}" if kv else ""


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class IngressMetrics:
    """Thread-safe counters of one ingress replica."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.tokens = 0
        self.prompt_tokens = 0
        self._window: deque[tuple[float, int]] = deque()

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def finished(self, prompt_tokens: int, seconds: float) -> None:
        """A generation request served to its end: its prompts' tokens and arrival-to-end time."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.latency.observe(seconds)

    def generated(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens += n
            self._window.append((now, n))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0][0] > WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / WINDOW_S

    def render(self, replicas: list[dict]) -> str:
        tps = self.tokens_per_second()
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("molora_requests_total", "counter",
                   "HTTP requests by route (completions, chat, tokenize, detokenize) and status.")
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"molora_requests_total{_labels(route=route, status=status)} {n}")
            family("molora_time_to_first_token_seconds", "histogram", "Request arrival to first generated token.")
            lines += self.ttft.lines("molora_time_to_first_token_seconds")
            family("molora_inter_token_latency_seconds", "histogram", "Time between streamed tokens.")
            lines += self.itl.lines("molora_inter_token_latency_seconds")
            family("molora_request_latency_seconds", "histogram",
                   "Request arrival to its last token, for generation requests served to their end.")
            lines += self.latency.lines("molora_request_latency_seconds")
            family("molora_prompt_tokens_total", "counter", "Prompt tokens of the generation requests served.")
            lines.append(f"molora_prompt_tokens_total {self.prompt_tokens}")
            family("molora_generated_tokens_total", "counter", "Tokens generated through this ingress.")
            lines.append(f"molora_generated_tokens_total {self.tokens}")
        family("molora_tokens_per_second", "gauge", f"Generated tokens per second over the last {WINDOW_S:.0f}s.")
        lines.append(f"molora_tokens_per_second {tps}")

        per_replica = [
            ("molora_queue_depth", "gauge", "Requests waiting for admission.", "waiting"),
            ("molora_running_requests", "gauge", "Requests in the running batch.", "running"),
            ("molora_hotset_hits_total", "counter", "Adapter pins served from a hot-set slot.", "hotset_hits"),
            ("molora_hotset_misses_total", "counter", "Adapter pins that had to load (host tier or cold).", None),
            ("molora_hotset_cold_loads_total", "counter", "Adapter pins loaded from storage.", "hotset_cold_loads"),
            ("molora_hotset_evictions_total", "counter", "Adapters evicted from the hot-set.", "hotset_evictions"),
            ("molora_adapter_load_seconds_sum", "counter", "Seconds spent loading adapters from the registry.",
             "adapter_load_seconds_total"),
            ("molora_adapter_load_seconds_count", "counter", "Adapter loads from the registry.", "adapter_loads"),
            ("molora_engine_prompt_tokens_total", "counter", "Prompt tokens admitted by the replica.", "prompt_tokens"),
            ("molora_engine_generated_tokens_total", "counter", "Tokens generated by the replica.", "generated_tokens"),
            ("molora_engine_cached_prompt_tokens_total", "counter",
             "Prompt tokens whose keys and values came from the prefix cache instead of a forward pass.",
             "cached_prompt_tokens"),
            ("molora_engine_prefix_hits_total", "counter", "Requests that started after a cached prompt prefix.",
             "prefix_hits"),
            ("molora_engine_cached_kv_slots", "gauge", "KV-cache slots holding a finished request's keys and values.",
             "cached_kv_slots"),
            ("molora_engine_rejected_total", "counter", "Requests refused by the engine.", "rejected"),
            ("molora_engine_decode_steps_total", "counter", "Engine steps with decode tokens only.", "decode_steps"),
            ("molora_engine_graph_steps_total", "counter",
             "Decode steps run at a fixed shape (CUDA-graph replays on CUDA).", "graph_steps"),
            ("molora_engine_graph_captures_total", "counter", "CUDA graphs captured by the engine.", "graph_captures"),
        ]
        for name, kind, help_, key in per_replica:
            family(name, kind, help_)
            for r in replicas:
                value = r.get("hotset_host_hits", 0) + r.get("hotset_cold_loads", 0) if key is None else r.get(key, 0)
                lines.append(f"{name}{_labels(replica=r['replica'])} {value}")
        family("molora_engine_requests_total", "counter",
               "Requests that left the replica's engine: finished (EOS, stop, length), aborted, failed.")
        for r in replicas:
            for outcome in ("finished", "aborted", "failed"):
                lines.append(f"molora_engine_requests_total{_labels(replica=r['replica'], outcome=outcome)} "
                             f"{r.get(outcome, 0)}")
        family("molora_adapter_tokens_total", "counter", "Step tokens per adapter key ('base' = no adapter).")
        for r in replicas:
            for adapter, n in sorted(r.get("tokens_by_adapter", {}).items()):
                lines.append(f"molora_adapter_tokens_total{_labels(replica=r['replica'], adapter=adapter)} {n}")
        return "\n".join(lines) + "\n"
