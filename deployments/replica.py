"""The model replica: one engine (base model + hot-set) behind a streaming Serve method.

    generate(payload) -> async stream of dicts:
        {"type": "start", "replica": id}                      (the request was accepted)
        {"type": "delta", "text", "tokens", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}
        {"type": "error", "status", "message", ...}             (see deployments.errors)

Besides serving, a replica
- cold-loads adapters and gate routers from the registry (object storage -> disk cache -> host
  memory -> a hot-set slot). Adapter and router loads run on the engine's background pool
  while running requests keep decoding.
- heartbeats its hot-set, load and per-adapter demand to the registry, and publishes its engine
  counters for the ingress's /metrics;
- follows registry events: a key of an updated or deleted adapter leaves its slot;
- prefetches the adapters the placement controller assigns it, into free slots only;
- reports its hot-set and queue to the adapter-affinity request router (`record_routing_stats`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from ray import serve

from adapter_store import ReplicaHeartbeat, UsageCounter
from deployments.bootstrap import engine_config, open_store
from deployments.config import AppConfig
from deployments.errors import ApiError, bad_request, classify
from deployments.resolve import parse_router_key
from molora_core import cpu_threads
from molora_core.engine import Engine, Request, RouterSpec, SamplingParams
from molora_core.errors import RouterInvalid
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, MixtureSpec

log = logging.getLogger("ray.serve")
STATS_TTL_S = 30.0


def stats_key(namespace: str, replica_id: str) -> str:
    return f"{namespace}:serve:stats:{replica_id}"


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No template in the checkpoint: ChatML, which the demo tokenizer's special tokens follow.
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def routing_spec(routing: dict):
    kind = routing["kind"]
    if kind == "base":
        return BaseSpec()
    if kind == "adapter":
        return AdapterSpec(routing["adapters"][0])
    if kind == "mixture":
        return MixtureSpec(tuple(routing["adapters"]), tuple(routing["weights"]))
    if kind == "router":
        return RouterSpec(routing["router"])
    raise ApiError(400, f"routing kind {kind!r} is not known")


class ModelReplica:
    """Serve deployment class; `deployments.app` sets its options and binds its config."""

    def __init__(self, config: dict, heartbeat_s: float = 2.0):
        cfg = AppConfig.model_validate(config)
        self.cfg = cfg
        threads = max(1, int(cfg.num_cpus_per_replica))
        import torch

        torch.set_num_threads(threads)  # the replica's CPU share, not every core of the node
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()
        self.model_dir = Path(cfg.model_path)
        self.store = open_store(cfg, self.model_dir)
        self.registry = self.store.registry
        self.load_seconds: deque[float] = deque(maxlen=1024)
        self.load_total_s = 0.0
        self.loads = 0
        self.usage = UsageCounter()
        self._usage_lock = threading.Lock()
        self.engine = Engine(self.model_dir, engine_config(cfg), adapter_loader=self._load_adapter,
                             router_loader=self._load_router, background=True)
        self._stop = threading.Event()
        self.heartbeat_s = heartbeat_s
        self._threads = [
            threading.Thread(target=self._heartbeat_loop, name="molora-heartbeat", daemon=True),
            threading.Thread(target=self._event_loop, name="molora-events", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("model replica %s up: %s, %d hot slots", self.replica_id, self.model_dir, cfg.hot_slots)

    # -- serving ---------------------------------------------------------------------------
    def _prompt_ids(self, payload: dict) -> tuple[list[int], tuple[int, ...]]:
        """The prompt's token ids as the engine prefills them (chat messages through the chat
        template), and the chat's end-of-turn token where it has one."""
        tokenizer = self.engine.tokenizer
        prompt = payload.get("prompt")
        stop_ids: tuple[int, ...] = ()
        if payload.get("messages") is not None:
            prompt = chat_prompt(tokenizer, payload["messages"])
            end = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != tokenizer.unk_token_id:
                stop_ids = (end,)
        if isinstance(prompt, str):
            prompt = list(tokenizer(prompt)["input_ids"])
        return list(prompt), stop_ids

    def _request(self, payload: dict) -> Request:
        # Token ids: the context check counts them, and echoed prompt scores line up with them.
        prompt, stop_ids = self._prompt_ids(payload)
        s = payload["sampling"]
        limit = self.engine.config.max_seq_len
        if s.get("max_tokens_set") and len(prompt) < limit < len(prompt) + s["max_tokens"]:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens (max_seq_len); the request asks for "
                f"{len(prompt) + s['max_tokens']}: {len(prompt)} in the prompt, max_tokens={s['max_tokens']} for "
                "the completion. Shorten the prompt or lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )
        sampling = SamplingParams(
            temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"],
            max_tokens=s["max_tokens"], min_tokens=s["min_tokens"], stop=tuple(s["stop"]),
            stop_token_ids=stop_ids + tuple(s["stop_token_ids"]),
            include_stop_str_in_output=s["include_stop_str_in_output"],
            ignore_eos=s["ignore_eos"], presence_penalty=s["presence_penalty"],
            frequency_penalty=s["frequency_penalty"], repetition_penalty=s["repetition_penalty"],
            logit_bias=tuple((token, bias) for token, bias in s["logit_bias"]), logprobs=s["logprobs"],
            prompt_logprobs=s["prompt_logprobs"],
        )
        return Request(prompt, sampling, routing_spec(payload["routing"]), request_id=payload.get("request_id"))

    def _logprob_items(self, logprobs, generated: bool = True) -> list:
        """[token text, logprob, [[alternative text, logprob], ...], shown] per token. The text is
        the token decoded alone (a piece of a multi-byte character shows as U+FFFD), special
        tokens by name; `shown`: the characters it adds to the output's text, which leaves a
        generated special token out (0), so text offsets count into the text. A logprob of -inf
        is sent as -9999.0, which JSON can carry."""
        decode, special = self.engine.tokenizer.decode, self._special_ids

        def finite(value: float) -> float:
            return max(value, -9999.0)

        items = []
        for lp in logprobs:
            text = decode([lp.token_id])
            shown = 0 if generated and lp.token_id in special else len(text)
            items.append([text, finite(lp.logprob), [[decode([t]), finite(v)] for t, v in lp.top], shown])
        return items

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        """The tokenizer's special token ids: the generated text skips them."""
        return frozenset(self.engine.tokenizer.all_special_ids)

    def _echo(self, payload: dict, ids: list[int], prompt_logprobs) -> dict:
        """The echoed prompt's fields of the first delta: its text and, where asked for, its
        tokens' [text, logprob, alternatives] (the first token's logprob and alternatives None)."""
        prompt = payload["prompt"]
        echo = {"echo": prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids)}
        if prompt_logprobs is not None:
            first = [self.engine.tokenizer.decode(ids[:1]), None, None]
            echo["prompt_logprobs"] = [first, *self._logprob_items(prompt_logprobs[1:], generated=False)]
        return echo

    async def generate(self, payload: dict):
        try:
            request = self._request(payload)
            handle = self.engine.submit(request)
        except Exception as exc:  # bad prompt or sampling, queue full, engine down
            yield classify(exc).to_item()
            return
        with self._usage_lock:
            self.usage.observe(payload["routing"]["adapters"])
        yield {"type": "start", "replica": self.replica_id, "actor": self.actor_name}
        echo = bool(payload.get("echo"))
        try:
            async for d in handle:
                item = {"type": "delta", "text": d.text, "tokens": len(d.token_ids), "prompt_tokens": d.prompt_tokens,
                        "completion_tokens": d.completion_tokens, "cached_tokens": d.cached_tokens,
                        "finish_reason": d.finish_reason,
                        "logprobs": None if d.logprobs is None else self._logprob_items(d.logprobs)}
                if echo:  # with the first delta
                    item.update(self._echo(payload, list(request.prompt), d.prompt_logprobs))
                    echo = False
                yield item
        except Exception as exc:  # unknown adapter at load, hot-set full too long, engine failure
            yield classify(exc).to_item()
        finally:
            handle.close()  # no-op when finished; aborts when the caller went away

    def tokenize(self, payload: dict) -> dict:
        """`/tokenize`: the ids generation would prefill for this prompt or these messages."""
        try:
            ids, _ = self._prompt_ids(payload)
        except Exception as exc:  # a chat template that refuses the messages
            return classify(exc).to_item()
        return {"type": "tokens", "count": len(ids), "max_model_len": self.engine.config.max_seq_len, "tokens": ids}

    def detokenize(self, payload: dict) -> dict:
        """`/detokenize`: the text of token ids (special tokens included)."""
        tokens, vocab = payload["tokens"], self.engine.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            return bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens").to_item()
        return {"type": "text", "prompt": self.engine.tokenizer.decode(tokens)}

    def record_routing_stats(self) -> dict:
        """Pulled by Serve every request_routing_stats_period_s for the request router."""
        hot = list(self.engine.hotset.resident())
        stats = self.engine.stats()
        return {"hot_set": hot, "queue": stats.waiting + stats.running, "at": time.time()}

    def check_health(self) -> None:
        self.engine.check_alive()

    def info(self) -> dict:
        return {"replica": self.replica_id, "actor": self.actor_name, "hot_set": list(self.engine.hotset.resident())}

    # -- loading -----------------------------------------------------------------------------
    def _load_adapter(self, key: str):
        name, _, version = key.partition("@")
        started = time.perf_counter()
        artifact = self.registry.load_adapter(name, int(version) if version else None)
        adapter = load_peft_adapter(artifact.path, name=key)
        self._record_load(time.perf_counter() - started)
        return adapter

    def _load_router(self, key: str) -> GateRouter:
        name, version, keys = parse_router_key(key)
        artifact = self.registry.load_router(name, version)
        gate = GateRouter.load(artifact.path)
        names = [k.partition("@")[0] for k in keys]
        if names != list(gate.adapters):
            raise RouterInvalid(f"router {name!r} holds adapters {gate.adapters}; its manifest lists {names}")
        gate.adapters = list(keys)  # the hot-set keys of the versions resolved by the ingress
        return gate

    def _record_load(self, seconds: float) -> None:
        self.load_seconds.append(seconds)
        self.load_total_s += seconds
        self.loads += 1

    # -- background: heartbeat, stats, prefetch, events ----------------------------------------
    def _beat(self) -> None:
        with self._usage_lock:
            demand, co_usage = self.usage.drain()
        stats = self.engine.stats()
        hot = list(stats.resident_adapters)
        self.registry.replicas.heartbeat(ReplicaHeartbeat(
            replica_id=self.replica_id, capacity=self.cfg.hot_slots, hot_set=hot, address=self.actor_name,
            load=float(stats.waiting + stats.running), demand=demand, co_usage=co_usage,
        ))
        record = {**asdict(stats), "replica": self.replica_id, "adapter_loads": self.loads,
                  "adapter_load_seconds_total": self.load_total_s, "ts": time.time()}
        ns = self.store.settings.namespace
        self.registry.client.set(stats_key(ns, self.replica_id), json.dumps(record), px=int(STATS_TTL_S * 1000))
        self._prefetch(hot)

    def _prefetch(self, hot: list[str]) -> None:
        free = self.cfg.hot_slots - len(hot)
        for key in self.registry.replicas.assignment(self.replica_id):
            if free <= 0:
                return
            if key in hot or "@" not in key:
                continue
            name, _, version = key.partition("@")
            try:
                if self.registry.get_adapter(name).version != int(version):
                    # Superseded since the plan was made: loading it would bring back the key
                    # that the registry event just took out of its slot.
                    continue
                self.engine.load_adapter(key, self._load_adapter(key))
                free -= 1
            except Exception as exc:  # deleted since the plan, storage down: the next beat retries
                log.warning("prefetch of %s failed: %r", key, exc)

    def _heartbeat_loop(self) -> None:
        cpu_threads.confine()  # prefetches copy weights here: without a team of their own (see cpu_threads)
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception as exc:  # Redis down: keep serving, beat again later
                log.warning("heartbeat failed: %r", exc)

    def _on_event(self, event) -> None:
        if event.kind != "adapter" or event.type not in ("adapter.registered", "adapter.deleted"):
            return
        for key in list(self.engine.hotset.resident()):
            name, _, version = key.partition("@")
            if name != event.name or not version.isdigit():
                continue
            stale = int(version) < event.version if event.type == "adapter.registered" else int(version) == event.version
            if stale:
                self.engine.remove_adapter(key)  # freed now, or when its last running request ends
                log.info("adapter %s left its slot after %s", key, event.type)

    def _event_loop(self) -> None:
        """Follow the registry's event stream from where this replica started. Reading the stream
        (not pub/sub) means events published while Redis or this loop was away are caught up."""
        cpu_threads.confine()  # removals zero hot-set slots here
        last = None
        while not self._stop.is_set():
            try:
                if last is None:
                    last = self.registry.events.last_id()
                for event in self.registry.events.read(after=last, count=100, block_ms=1000):
                    self._on_event(event)
                    last = event.id
            except Exception as exc:  # Redis down: keep the position, try again shortly
                if self._stop.is_set():
                    break
                log.warning("event follower: %r", exc)
                self._stop.wait(1.0)

    def __del__(self):
        self._stop.set()
        try:
            self.registry.replicas.leave(self.replica_id)
            self.engine.close()
            self.store.close()
        except Exception:
            pass

