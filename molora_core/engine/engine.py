"""The continuous-batching engine: one base model, many adapters, per-token routing.

Each step runs the new tokens of every running sequence (prompt chunks and decode tokens) as
one flat batch through the decoder, with one routing plan for all of them, so requests on the
base model, on different adapters, on mixtures and on learned gate routers share every forward
pass. New requests join between steps; a request leaves on EOS, a stop string or token,
max_tokens, a full KV-cache row, an abort, or when its consumer drops its handle.

Requests pin their adapters in the hot-set from admission to exit. When every slot is pinned,
a request waits (bounded by `pin_timeout_s`, counted from its first try with a KV-cache slot
free) and is admitted once a running request releases a slot: requests queued behind it that
need adapters wait behind it (base-model ones go ahead), so a stream of requests for a resident
adapter cannot keep its slot pinned for ever. The wait queue itself is bounded by `max_queue`.
Checking requests, loading their adapters and routers off the step thread and pinning them is
`Admission`'s (`molora_core.engine.admission`).

A finished request's KV-cache slot keeps its keys and values until a slot is needed, and a new
request whose prompt begins with tokens a cached or running request computed under the same
routing starts after them (`KVSlots`, `molora_core.engine.kv_slots`: prefix caching).

The KV cache, the hot-set and the routing plan's dispatch buffers are allocated once at
start-up, at fixed addresses, so decode steps run as CUDA graphs captured per batch and length
bucket (`molora_core.engine.graphs`) on CUDA. The engine schedules; `StepRunner`
(`molora_core.engine.step`) routes and runs each step's forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterable

import torch

from kernels import cpu_ext, default_backend_name, get_backend
from molora_core import cpu_memory, cpu_threads
from molora_core.adapter import LoRAAdapter
from molora_core.engine.admission import AdapterLoader, Admission, RouterLoader
from molora_core.engine.config import EngineConfig
from molora_core.engine.graphs import DecodeGraphs, graph_mode
from molora_core.engine.kv_slots import KVSlots
from molora_core.engine.request import Request, RequestHandle, RequestOutput, SamplingParams, TokenLogprob, _Stream
from molora_core.engine.sampling import sample, score_tokens, token_logprobs
from molora_core.engine.sequence import Sequence
from molora_core.engine.step import StepRunner
from molora_core.engine.stats import Counters, EngineStats, percentile
from molora_core.errors import CapacityExceeded, RequestInvalid, RouterInvalid
from molora_core.hotset import HotSet
from molora_core.lora_layer import SHARED_INPUTS, LoRAContext, attach_molora, pack_for_cpu
from molora_core.model import KVCache, LoadedModel, load_pretrained
from molora_core.routing import BaseSpec, RoutingPlan, SequenceRouter

log = logging.getLogger(__name__)


class Engine:
    """Continuous batching over a model directory (or an already loaded model).

    Args:
        model: a model directory or a LoadedModel (its projections are wrapped in place).
        config: sizes fixed at start-up.
        adapter_loader: hot-set key -> LoRAAdapter, called on a hot-set miss (cold load).
        router_loader: router name -> GateRouter, for RouterSpec routing.
        background: run steps on a daemon thread (serving); False = the consumer of a handle
            drives `step()` itself (scripts, tests, benchmarks).
    """

    def __init__(
        self,
        model: str | Path | LoadedModel,
        config: EngineConfig | None = None,
        adapter_loader: AdapterLoader | None = None,
        router_loader: RouterLoader | None = None,
        background: bool = False,
    ):
        self.config = config = config or EngineConfig()
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_pretrained(model, config.dtype, device)
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.device = self.model.device
        self.vocab_size = self.model.config.vocab_size
        backend = get_backend(config.backend or self._default_backend())
        for option in ("decode_kernel", "prefill_kernel"):
            value = getattr(config, option)
            if value != "auto":
                if not hasattr(backend, option):
                    raise ValueError(f"{option}={value!r} needs the triton backend; this engine runs {backend.name!r}")
                setattr(backend, option, value)
        self.hotset = HotSet.for_model(
            self.model, config.target_modules, config.hot_slots, config.max_rank, shared_inputs=tuple(SHARED_INPUTS),
            dtype=self.model.dtype, device=self.device, b_layout=backend.b_layout,
        )
        self.context = LoRAContext(backend)
        attach_molora(self.model, self.hotset, self.context)
        self.packed_projections = pack_for_cpu(self.model) if self.device.type == "cpu" and config.pack_weights else 0
        if self.device.type == "cpu":
            cpu_memory.keep_freed_memory()  # prefill temporaries reuse freed pages (see cpu_memory)
        if self.device.type == "cpu" and not cpu_ext.native_dots(self.model.dtype):
            log.warning(
                "%s weights on a CPU without %s dot-product instructions: its base matmuls run several times "
                "slower than float32 ones (3.5-10x for bf16 on an AVX2 CPU); float32 serves faster here",
                self.model.dtype, str(self.model.dtype).removeprefix("torch."),
            )
        mode = graph_mode(config.decode_graphs, self.device, backend.name, self.model.rotary.rope_type)
        # Fixed-shape decode steps pad with rows that write a scratch KV slot past the last one.
        kv_slots = config.max_batch + (mode is not None)
        self.kv_cache = KVCache.for_model(self.model, kv_slots, config.max_seq_len)
        self.plan = RoutingPlan(config.step_tokens, config.max_top_k, config.hot_slots, self.device)
        graphs = None if mode is None else DecodeGraphs(
            self.model, self.kv_cache, self.context, config.max_batch, config.max_seq_len, mode,
            max_gates=config.max_routers,
        )
        self.runner = StepRunner(self.model, self.kv_cache, self.plan, self.context, graphs, config.max_top_k)
        self.graph_error: str | None = None  # why fixed-shape decode was turned off at start-up
        if self.graphs is not None and config.capture_at_start:
            try:
                with torch.inference_mode():
                    self.graphs.capture_all(self.runner.unrouted_plan)
            except Exception as exc:  # a capture that fails must not take the engine down
                log.warning("decode graphs turned off, every step runs eagerly: capture failed: %r", exc)
                self.runner.graphs, self.graph_error = None, repr(exc)
        self.eos_ids = loaded.eos_token_ids()
        self.admission = Admission(
            config, self.tokenizer, self.vocab_size, self.model.config.hidden_size, self.device, self.hotset,
            self.eos_ids, adapter_loader, router_loader,
        )
        self.counters = Counters()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        # Under the "dynamic" rope type a prompt's keys rotate for its own length: no sharing.
        self.kv_slots = KVSlots(self.kv_cache, config.max_batch,
                                config.prefix_caching and self.model.rotary.rope_type != "dynamic")
        self._aborts: set[str] = set()
        self._dropped: deque[tuple[str, _Stream]] = deque()  # handles finalized unread (see _drop)
        self._ids: dict[str, _Stream] = {}  # request id -> stream, of those waiting or running
        self._lock = threading.Lock()  # guards _waiting, _aborts, _ids (touched by callers)
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.RLock()  # held while a step (or a hot-set change) runs
        self._closed = False
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            # The step thread's OpenMP team does the computing from now on; this thread's, which
            # loaded the weights, would only throttle it (see cpu_threads).
            cpu_threads.release()
            self._thread = threading.Thread(target=self._loop, name="molora-engine", daemon=True)
            self._thread.start()

    @property
    def graphs(self) -> DecodeGraphs | None:
        """The fixed-shape decode runner (CUDA graphs), or None when every step runs eagerly."""
        return self.runner.graphs

    def _default_backend(self) -> str:
        # On CPU the torch twins with the compiled LoRA kernel. (TRITON_INTERPRET=1, set by the
        # test suite for kernel tests, would make default_backend_name pick the Triton
        # interpreter on CPU, far too slow to serve with.)
        return "cpu" if self.device.type == "cpu" else default_backend_name(self.device)

    # -- public API ------------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def submit(self, request: Request | str, sampling: SamplingParams | None = None) -> RequestHandle:
        """Queue a request and return its handle. Keep the handle: dropping it aborts the request.

        Raises RequestInvalid for a bad prompt or routing, CapacityExceeded when the wait queue
        holds `max_queue` requests.
        """
        if isinstance(request, str):
            request = Request(request, sampling or SamplingParams())
        self.check_alive()
        try:
            seq = self.admission.sequence(request)
        except (RequestInvalid, RouterInvalid):
            self.counters.rejected += 1
            raise
        with self._lock:
            self.check_alive()  # (again: close() may have run since; it ends only what it finds queued)
            if len(self._waiting) >= self.config.max_queue:
                self.counters.rejected += 1
                raise CapacityExceeded(
                    f"the wait queue is full ({self.config.max_queue} requests); retry later"
                )
            if request.request_id in self._ids:
                self.counters.rejected += 1
                raise RequestInvalid(f"request id {request.request_id!r} is already in use")
            self._ids[request.request_id] = seq.stream
            self._waiting.append(seq)
            self.counters.submitted += 1
            self._wake.notify_all()
        return RequestHandle(self, request, seq.stream)

    def generate(self, requests: Iterable[Request | str], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Run requests to completion (offline batch, of any size: without a step thread, steps
        run while the wait queue is full); outputs in input order."""
        handles = []
        for r in requests:
            if not self.running_in_background:
                while self.stats().waiting >= self.config.max_queue:
                    self.step()
            handles.append(self.submit(r, sampling))
        return [h.result() for h in handles]

    def abort(self, request_id: str, stream: _Stream | None = None) -> None:
        """Stop a request (waiting or running); its stream ends with finish_reason 'abort'.
        `stream`: only while the request under that id is the one with this stream (a handle
        closed after its request ended must not stop a later request that reuses the id)."""
        with self._lock:
            live = self._ids.get(request_id)
            if live is not None and (stream is None or live is stream):
                self._aborts.add(request_id)
                self._wake.notify_all()

    def _drop(self, request_id: str, stream: _Stream) -> None:
        """`abort` for a handle's finalizer. That runs wherever the cyclic garbage collector does,
        on the step thread inside `_lock` too, so it takes no lock: the step loop applies it."""
        self._dropped.append((request_id, stream))

    def load_adapter(self, key: str, adapter: LoRAAdapter) -> int:
        """Prefetch `adapter` into the hot-set under `key` (between steps); returns its slot."""
        with self._step_lock:
            return self.hotset.load(key, adapter)

    def remove_adapter(self, key: str) -> None:
        """Drop `key` from the hot-set (freed now, or when its last request ends), and any load
        of it fetched for requests not yet admitted: the next request for `key` loads it anew."""
        with self._step_lock:
            self.hotset.remove(key)
            self.admission.forget(key)

    def stats(self) -> EngineStats:
        c, h = self.counters, self.hotset
        with self._lock:
            waiting = len(self._waiting)
        resident = h.resident()
        return EngineStats(
            waiting=waiting, running=len(self._running), submitted=c.submitted, finished=c.finished,
            aborted=c.aborted, failed=c.failed, rejected=c.rejected, prompt_tokens=c.prompt_tokens,
            generated_tokens=c.generated_tokens, steps=c.steps, decode_steps=c.decode_steps,
            graph_steps=self.runner.fixed_steps, graph_captures=0 if self.graphs is None else self.graphs.captures,
            tokens_by_adapter=dict(c.tokens_by_adapter), hotset_hits=h.stats.hits,
            hotset_host_hits=h.stats.host_hits, hotset_cold_loads=h.stats.cold_loads,
            hotset_evictions=h.stats.evictions, resident_adapters=resident,
            pinned_adapters={k: h.pins(k) for k in resident}, ttft_p50_s=percentile(c.ttft_s, 50),
            ttft_p99_s=percentile(c.ttft_s, 99), step_p50_s=percentile(c.step_s, 50),
            step_p99_s=percentile(c.step_s, 99), prefix_hits=self.kv_slots.hits,
            cached_prompt_tokens=self.kv_slots.reused_tokens, cached_kv_slots=self.kv_slots.cached(),
        )

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborts)

    def check_alive(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"the engine's step thread died: {self._fatal!r}") from self._fatal
        if self._closed:
            raise RuntimeError("the engine is closed")

    def close(self) -> None:
        """Stop the step thread and end every request with finish_reason 'abort'."""
        with self._lock:
            self._closed = True
            self._aborts.update(self._ids)
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._step_lock:
            self._apply_aborts()
        self.admission.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, run one forward over every running sequence, sample, stream. False = idle."""
        with self._step_lock:
            self._apply_aborts()
            self._admit()
            if not self._running:
                with self._lock:
                    blocked = bool(self._waiting)
                if blocked:  # waiting for hot-set slots that no running request will free
                    time.sleep(0.005)
                return blocked
            self._run_batch()
            return True

    def _loop(self) -> None:
        try:
            while not self._closed:
                if not self.step():
                    with self._lock:
                        if not (self._waiting or self._aborts or self._dropped or self._closed):
                            self._wake.wait(timeout=1.0)
        except BaseException as exc:  # a bug in a step: fail every request instead of hanging them
            self._fatal = exc
            with self._step_lock:
                for seq in list(self._running) + list(self._waiting):
                    self._fail(seq, RuntimeError(f"engine step failed: {exc!r}"))

    # -- admission -------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._lock:
            candidates = list(self._waiting)
        held = False  # an earlier request waits for hot-set slots: later ones take no adapter pins
        for seq in candidates:
            if not self.kv_slots.available():
                return
            if seq.pin_since is None:  # (its wait for adapters starts now, not at its arrival)
                seq.pin_since = time.monotonic()
            if held and not isinstance(seq.request.routing, BaseSpec):
                admitted = False  # (pinning adapters the waiter's slots hold would keep it waiting)
            else:
                try:
                    admitted = self.admission.pin(seq)
                except Exception as exc:  # unknown or invalid adapter / router, loader failure
                    self._fail(seq, exc)
                    continue
                held = held or (not admitted and seq.blocked_on_slots)
            if not admitted:
                waited = time.monotonic() - seq.pin_since
                if waited > self.config.pin_timeout_s:
                    what = self.admission.waiting_for(seq)
                    self._fail(seq, CapacityExceeded(f"request {seq.request_id!r} waited {waited:.1f}s for {what}"))
                continue
            with self._lock:
                self._waiting.remove(seq)
            self.kv_slots.assign(seq, self._running)
            self._running.append(seq)
            self.counters.prompt_tokens += len(seq.prompt_ids)

    # -- exits -----------------------------------------------------------------------------
    def _release(self, seq: Sequence, keep: bool = True) -> None:
        """Unpin seq's adapters and leave its KV slot: cached for prefix reuse where `keep` (its
        rows are whole), zeroed otherwise. Decode attention reads a slot's rows past its own
        length (masked, weight 0), so whatever later takes a slot finds them zeroed (the cached
        rows past the prefix it shares too): an earlier occupant's inf or NaN values can never
        leak in as 0 * NaN."""
        self.admission.unpin(seq)
        self.kv_slots.release(seq, keep, self._running)
        if seq in self._running:
            self._running.remove(seq)
        with self._lock:
            if seq in self._waiting:
                self._waiting.remove(seq)
            if self._ids.get(seq.request_id) is seq.stream:
                del self._ids[seq.request_id]
                self._aborts.discard(seq.request_id)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._release(seq, keep=False)
        self.counters.failed += 1
        seq.stream.put(exc)

    def _finish(self, seq: Sequence, reason: str, token_ids: tuple[int, ...] = (),
                logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if reason != "stop" or not seq.detok.stopped:
            seq.detok.flush(check_stop=len(seq.output_ids) >= seq.request.sampling.min_tokens)
            if reason == "length" and seq.detok.stopped:
                reason = "stop"  # the held-back tail held a stop string: the text ends there
        seq.stream.put(seq.delta(seq.detok.take_delta(final=True), token_ids, reason, logprobs))
        self._release(seq)
        if reason == "abort":
            self.counters.aborted += 1
        else:
            self.counters.finished += 1

    def _apply_aborts(self) -> None:
        with self._lock:
            while self._dropped:
                request_id, stream = self._dropped.popleft()
                if self._ids.get(request_id) is stream:
                    self._aborts.add(request_id)
            if not self._aborts:
                return
            aborts = set(self._aborts)
            doomed = [s for s in list(self._waiting) + self._running if s.request_id in aborts]
        for seq in doomed:
            self._finish(seq, "abort")

    # -- one forward -----------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) of this step: every decode first, then prompt chunks.

        Sequences are grouped by adapter slot, so each slot's tokens form contiguous runs that
        the LoRA backend takes as views instead of gathering and scattering them; within a group
        they go by KV slot, so decode rows that fill a span of the cache reach attention in its
        order (`AttentionMeta.decode_direct`: no scatter into the span and gather back).
        """
        budget = self.config.step_tokens
        entries = []
        # (A sequence that shares a prompt prefix sits out until its source has computed it.)
        order = sorted((seq for seq in self._running if self.kv_slots.ready(seq)),
                       key=lambda seq: (_slot_order(seq), seq.kv_slot))
        for seq in order:
            if seq.num_tokens - seq.num_computed == 1:
                entries.append((seq, 1))
                budget -= 1
        for seq in order:
            remaining = seq.num_tokens - seq.num_computed
            if remaining > 1 and budget > 0:
                n = min(remaining, self.config.prefill_chunk, budget)
                entries.append((seq, n))
                budget -= n
        return entries

    def _run_batch(self) -> None:
        started = time.perf_counter()
        entries = self._schedule()
        flat = [t for seq, n in entries for t in seq.pending_ids(n)]
        is_decode = all(n == 1 for _, n in entries) and all(s.num_computed > 0 for s, _ in entries)
        scored = [b for b, (seq, _) in enumerate(entries)
                  if seq.prompt_logprobs is not None and seq.num_computed < len(seq.prompt_ids)]
        try:
            logits, hidden = self.runner.logits(entries, flat, is_decode, scored)
        except Exception as exc:  # the forward: every entry's
            for seq, _ in entries:
                self._fail(seq, exc)
            return
        failed: dict[int, Exception] = {}  # entry -> its own error: the others of the step go on
        for b in scored:  # the prompt tokens this step's new tokens predict: their successors in the prompt
            seq, n = entries[b]
            targets = seq.prompt_ids[seq.num_computed + 1 : seq.num_computed + n + 1]
            try:
                seq.prompt_logprobs += score_tokens(self.model.lm_head, hidden[b], targets,
                                                    seq.request.sampling.prompt_logprobs)
            except Exception as exc:
                failed[b] = exc
        ready = [b for b, (seq, n) in enumerate(entries)
                 if b not in failed and seq.num_computed + n == seq.num_tokens]  # entries that sample a token
        tokens, logprobs = self._sample(entries, ready, logits, failed)
        ready = [entries[b][0] for b in ready if b not in failed]
        for b, exc in failed.items():
            self._fail(entries[b][0], exc)
        entries = [entry for b, entry in enumerate(entries) if b not in failed]
        c = self.counters
        c.steps += 1
        c.decode_steps += is_decode
        for seq, n in entries:
            seq.num_computed += n
            for key in (seq.spec.adapter_names() or ["base"]):
                c.tokens_by_adapter[key] = c.tokens_by_adapter.get(key, 0) + n
        for seq, token, logprob in zip(ready, tokens, logprobs):
            if seq.request.sampling.max_tokens == 0:  # the prompt scored, nothing to generate
                self._finish(seq, "length")
            else:
                self._emit(seq, token, logprob)
        c.step_s.append(time.perf_counter() - started)

    def _sample(self, entries: list[tuple[Sequence, int]], ready: list[int], logits: torch.Tensor,
                failed: dict[int, Exception]) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token (and its log-probability) of each entry in `ready`, from its row of
        logits [B, V], in one call; if that raises, row by row, so that an error of one entry's
        sampling (entered in `failed`, its token dropped) fails that request alone. (Rows drawn
        again then: a seeded request's token may differ from the one a step without the error
        would have given it.)"""
        if not ready:
            return [], []

        def run(rows: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
            seqs = [entries[b][0] for b in rows]
            params = [seq.request.sampling for seq in seqs]
            picked = logits if len(rows) == logits.shape[0] else logits[rows]
            tokens = sample(picked, params, [seq.generator for seq in seqs], [seq.adjust for seq in seqs])
            return tokens, token_logprobs(picked, tokens, [p.logprobs for p in params])

        try:
            return run(ready)
        except Exception:
            tokens, logprobs = [], []
            for b in ready:
                try:
                    (token,), (logprob,) = run([b])
                except Exception as exc:
                    failed[b] = exc
                    continue
                tokens.append(token)
                logprobs.append(logprob)
            return tokens, logprobs

    def _emit(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.counters.ttft_s.append(now - seq.arrival)
        seq.output_ids.append(token)
        if seq.adjust is not None:
            seq.adjust.observe(token)
        self.counters.generated_tokens += 1
        p = seq.request.sampling
        reason = None
        stops = len(seq.output_ids) >= p.min_tokens  # before min_tokens nothing stops the sequence
        if stops and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)):
            reason = "stop"
            if p.include_stop_str_in_output and token in p.stop_token_ids:
                seq.detok.add(token, check_stop=False)
        else:
            seq.detok.add(token, check_stop=stops)
            if seq.detok.stopped:
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_seq_len):
            reason = "length"
        logprobs = () if logprob is None else (logprob,)
        if reason is None:
            seq.stream.put(seq.delta(seq.detok.take_delta(final=False), (token,), logprobs=logprobs))
        else:
            self._finish(seq, reason, (token,), logprobs)


def _slot_order(seq: Sequence) -> int:
    """Base-model sequences first, then single-adapter ones by slot, then mixed routers."""
    router = seq.router
    if router is None:
        return -1
    return router.slot if isinstance(router, SequenceRouter) else 1 << 30
