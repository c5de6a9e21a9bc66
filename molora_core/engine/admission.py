"""The engine's admission side: requests checked and turned into sequences, their adapters and
routers loaded off the step thread and pinned in the hot-set.

`Admission.sequence` runs in the caller's thread at submit (a bad prompt, routing or sampling
value raises there, before anything is queued). `pin` and `unpin` run on the step thread: a
sequence is admitted once `pin` holds every adapter its routing names, and holds them until it
leaves. Cold loads (object storage, disk) run on two fetcher threads, so running requests keep
decoding while a new request's adapters arrive; `pin` answers False until they have.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from molora_core import cpu_threads
from molora_core.adapter import LoRAAdapter
from molora_core.engine.config import EngineConfig
from molora_core.engine.detokenize import IncrementalDetokenizer
from molora_core.engine.request import Request, RouterSpec, _Stream
from molora_core.engine.sampling import LogitAdjust
from molora_core.engine.sequence import Sequence
from molora_core.errors import CapacityExceeded, RequestInvalid, RouterInvalid
from molora_core.hotset import HotSet
from molora_core.routing import GateRouter, GateSpec, MixtureSpec

AdapterLoader = Callable[[str], LoRAAdapter]
RouterLoader = Callable[[str], GateRouter]


class Admission:
    """Checks requests against the engine's sizes and pins what their routing names.

    Args:
        config: the engine's sizes (hot_slots, max_top_k, max_seq_len, max_routers).
        tokenizer: encodes text prompts.
        vocab_size, hidden_size: the model's.
        device: where sequences' logit adjustments and gate routers live.
        hotset: the slots adapters are pinned in.
        eos_ids: the model's end-of-sequence tokens (which `min_tokens` holds back).
        adapter_loader: hot-set key -> LoRAAdapter, called on a hot-set miss (cold load).
        router_loader: router name -> GateRouter, for RouterSpec routing.
    """

    def __init__(
        self, config: EngineConfig, tokenizer, vocab_size: int, hidden_size: int, device: torch.device,
        hotset: HotSet, eos_ids: tuple[int, ...], adapter_loader: AdapterLoader | None = None,
        router_loader: RouterLoader | None = None,
    ):
        self.config, self.tokenizer, self.hotset = config, tokenizer, hotset
        self.vocab_size, self.hidden_size, self.device = vocab_size, hidden_size, device
        self.eos_ids = tuple(eos_ids)
        self.adapter_loader, self.router_loader = adapter_loader, router_loader
        self._routers: OrderedDict[str, GateRouter] = OrderedDict()
        # Confined to one CPU thread each: an OpenMP team of their own would slow every step's
        # ops (see cpu_threads).
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="molora-fetch",
                                           initializer=cpu_threads.confine)
        self._fetches: dict[str, Future] = {}  # hot-set key -> load in flight or finished
        self._router_fetches: dict[str, Future] = {}  # router name -> load in flight or finished

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)

    # -- at submit (the caller's thread) ----------------------------------------------------
    def sequence(self, request: Request) -> Sequence:
        """The request's sequence; raises RequestInvalid / RouterInvalid naming what is wrong."""
        prompt = request.prompt
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestInvalid(f"request {request.request_id!r} has an empty prompt")
        room = 1 if request.sampling.max_tokens > 0 else 0  # (a request that only scores its prompt needs none)
        if len(ids) + room > self.config.max_seq_len:
            raise RequestInvalid(
                f"prompt of {len(ids)} tokens does not fit max_seq_len={self.config.max_seq_len}"
                + (" with room for one generated token" if room else "")
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestInvalid(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        spec = request.routing
        if not isinstance(spec, RouterSpec):
            names = spec.adapter_names()
            if len(names) > self.config.hot_slots:
                raise RequestInvalid(
                    f"routing names {len(names)} adapters; the hot-set has {self.config.hot_slots} slots"
                )
            if isinstance(spec, MixtureSpec) and len(names) > self.config.max_top_k:
                raise RequestInvalid(f"a mixture of {len(names)} adapters exceeds max_top_k={self.config.max_top_k}")
            if isinstance(spec, GateSpec):
                self.check_router(spec.router, "the request's gate router")
                device = spec.router.gate.weight.device
                if device != self.device:
                    raise RouterInvalid(
                        f"the request's gate router is on {device}; this engine runs on {self.device} "
                        "(move it with router.to(device) first)"
                    )
        p = request.sampling
        bad = [t for t, _ in p.logit_bias if t >= self.vocab_size]
        if bad:
            raise RequestInvalid(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        adjust = None
        if p.adjusts_logits:
            ends = () if p.ignore_eos else self.eos_ids
            held = sorted({t for t in ends + p.stop_token_ids if 0 <= t < self.vocab_size})
            adjust = LogitAdjust(p, self.vocab_size, self.device, ids, held)
        detok = IncrementalDetokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output, prompt=ids)
        seq = Sequence(request, _Stream(), ids, detok, generator, adjust)
        if p.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        return seq

    def check_router(self, router: GateRouter, what: str) -> None:
        if router.hidden_size != self.hidden_size:
            raise RouterInvalid(f"{what} reads hidden size {router.hidden_size}; the model's is {self.hidden_size}")
        if router.top_k > self.config.max_top_k:
            raise RouterInvalid(f"{what} has top_k={router.top_k} > max_top_k={self.config.max_top_k}")

    # -- on the step thread -----------------------------------------------------------------
    def pin(self, seq: Sequence) -> bool:
        """Pin every adapter of seq's routing; False (holding nothing) while a load runs or the
        hot-set is full. Raises for an unknown or invalid adapter or router."""
        if seq.spec is None:
            spec = seq.request.routing
            if isinstance(spec, RouterSpec):
                router = self._gate(spec.router)
                if router is None:
                    return False  # loading in the background
                spec = GateSpec(router)
            seq.spec = spec
        names = seq.spec.adapter_names()
        if len(names) > self.config.hot_slots:
            raise RequestInvalid(f"routing names {len(names)} adapters; the hot-set has {self.config.hot_slots} slots")
        if not self._fetched(names):
            return False
        seq.blocked_on_slots = False
        try:
            for name in names:
                future = self._fetches.get(name)
                if future is not None:
                    loader = future.result
                elif self.adapter_loader is not None:  # evicted since _fetched: rare, load in line
                    loader = lambda n=name: self.adapter_loader(n)  # noqa: E731
                else:
                    loader = None
                seq.pinned.append((name, self.hotset.acquire(name, loader)))
                self._fetches.pop(name, None)
        except CapacityExceeded:
            self.unpin(seq)
            seq.blocked_on_slots = True
            return False
        except BaseException:
            self.unpin(seq)
            self._fetches.pop(name, None)  # (a load the hot-set refused: the next request loads anew)
            for name in names:  # a failed load is retried by the next request that needs it
                future = self._fetches.get(name)
                if future is not None and future.done() and future.exception() is not None:
                    del self._fetches[name]
            raise
        seq.router = seq.spec.bind(dict(seq.pinned))
        seq.kv_key = self._kv_key(seq)
        return True

    def _kv_key(self, seq: Sequence) -> tuple | None:
        """What seq's keys and values depend on besides its tokens: its router's routes, the load
        serial of each slot it pinned, and its gate (held, so the key's id of it stays its own)
        with its weights' versions (a gate trained further in place routes anew)."""
        router = seq.router
        if router is None:
            return ("base",)
        if router.route_key is None:
            return None
        loads = tuple(self.hotset.serial(slot) for _, slot in seq.pinned)
        gate = getattr(router, "gate", None)
        weights = () if gate is None else tuple((p.data_ptr(), p._version) for p in gate.parameters())
        return router.route_key, loads, gate, weights

    def unpin(self, seq: Sequence) -> None:
        for key, slot in seq.pinned:
            self.hotset.release(key, slot)
        seq.pinned.clear()

    def waiting_for(self, seq: Sequence) -> str:
        """What an unadmitted sequence waits for, in words (for its timeout's error)."""
        if seq.spec is None:
            return f"router {seq.request.routing.router!r} to load"
        return (f"its adapters {seq.spec.adapter_names()} to load and find hot-set slots "
                f"(all {self.config.hot_slots} stay pinned, or loading is that slow)")

    def _gate(self, name: str) -> GateRouter | None:
        """Router `name`, or None while its load runs in the background (started here, so a
        router read from object storage never stalls the step thread). A failed load raises
        here, for the request that waited on it; the next request retries."""
        router = self._routers.get(name)
        if router is not None:
            self._routers.move_to_end(name)
            return router
        if self.router_loader is None:
            raise RouterInvalid(f"router {name!r} requested but the engine has no router_loader")
        future = self._router_fetches.get(name)
        if future is None:
            self._router_fetches[name] = self._fetcher.submit(self.router_loader, name)
            return None
        if not future.done():
            return None
        del self._router_fetches[name]
        router = future.result()
        self.check_router(router, f"router {name!r}")
        router = router.to(self.device).eval()
        self._routers[name] = router
        while len(self._routers) > self.config.max_routers:
            self._routers.popitem(last=False)
        return router

    def forget(self, name: str) -> None:
        """Drop adapter `name`'s background load, finished or not (the hot-set dropped `name`):
        a request for it loads it anew instead of taking what was fetched before."""
        future = self._fetches.pop(name, None)
        if future is not None:
            future.cancel()

    def _fetched(self, names: list[str]) -> bool:
        """Start background loads of the adapters that are neither resident nor in host memory;
        True once none of `names` is still loading."""
        ready = True
        for name in names:
            if self.hotset.holds(name) or self.adapter_loader is None:
                continue  # acquire pins it, or raises AdapterNotFound without a loader
            future = self._fetches.get(name)
            if future is None:
                self._fetches[name] = self._fetcher.submit(self._load_adapter, name)
                ready = False
            elif not future.done():
                ready = False
        return ready

    def _load_adapter(self, name: str) -> LoRAAdapter:
        started = time.perf_counter()
        adapter = self.adapter_loader(name)
        self.hotset.stats.load_seconds += time.perf_counter() - started
        return adapter
