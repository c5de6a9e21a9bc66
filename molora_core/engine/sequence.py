"""The engine's per-request state while a request waits or runs (owned by the step thread)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from molora_core.engine.detokenize import IncrementalDetokenizer
from molora_core.engine.request import Request, StreamDelta, TokenLogprob, _Stream
from molora_core.engine.sampling import LogitAdjust
from molora_core.routing.routers import Router
from molora_core.routing.spec import RoutingSpec


@dataclass(eq=False)  # identity: two requests are never the same sequence
class Sequence:
    request: Request
    stream: _Stream
    prompt_ids: list[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    adjust: LogitAdjust | None = None  # logit_bias and penalties, where the request sets them
    spec: RoutingSpec | None = None  # resolved at admission (a RouterSpec becomes a GateSpec)
    pinned: list[tuple[str, int]] = field(default_factory=list)  # (hot-set key, slot) held
    router: Router | None = None
    kv_slot: int = -1
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    # What its keys and values depend on besides the tokens: its routes and the adapters' loads
    # (None: never shared). Sequences with equal keys share prompt prefixes (engine.kv_slots).
    kv_key: tuple | None = None
    share: tuple["Sequence", int] | None = None  # (running sequence, prefix length) to copy before it runs
    cached_tokens: int = 0  # prompt tokens whose keys and values it reused instead of computing
    output_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    pin_since: float | None = None  # when admission first tried it with a KV-cache slot free
    blocked_on_slots: bool = False  # its last pin found the hot-set's slots all pinned
    # Where the request asked for them: the prompt tokens' log-probabilities scored so far
    # (None for the first); handed out with the first delta, then None.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def pending_ids(self, n: int) -> list[int]:
        """The next n tokens not yet in the cache."""
        start = self.num_computed
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start : start + n]
        return [self.token(i) for i in range(start, start + n)]

    def delta(self, text: str, token_ids: tuple[int, ...], finish_reason=None,
              logprobs: tuple[TokenLogprob, ...] = ()) -> StreamDelta:
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return StreamDelta(
            self.request_id, text, token_ids, len(self.prompt_ids), len(self.output_ids),
            finish_reason is not None, finish_reason,
            None if self.request.sampling.logprobs is None else logprobs,
            None if prompt_logprobs is None else tuple(prompt_logprobs), self.cached_tokens,
        )
