"""What a caller submits (Request, SamplingParams) and what it gets back (deltas, a final output).

A `RequestHandle` is consumed either synchronously (`for delta in handle`) or from asyncio
(`async for delta in handle`); the engine's step thread feeds it through a thread-safe stream.
Dropping or closing a handle before the request finishes aborts it, which frees its KV-cache
slot and its hot-set pins at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

from molora_core.errors import RequestInvalid
from molora_core.routing.spec import BaseSpec, RoutingSpec

if TYPE_CHECKING:
    from molora_core.engine.engine import Engine

FinishReason = Literal["stop", "length", "abort", "error"]
_ids = itertools.count()
# At most this many alternatives per generated token (`SamplingParams.logprobs`), as OpenAI's chat API.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class RouterSpec:
    """A learned gate router by name, resolved through the engine's `router_loader`."""

    router: str


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) filtered by top_k and top_p.

    Before either, as OpenAI defines them: logits[j] += logit_bias[j] - c[j] * frequency_penalty
    - (c[j] > 0) * presence_penalty, with c[j] the times token j was generated so far (the
    prompt does not count). `logit_bias` maps token ids to biases in [-100, 100] (a dict, or
    (id, bias) pairs); penalties lie in [-2, 2]. `repetition_penalty` (transformers' and vLLM's,
    in (0, 10]) then divides the positive logits, and multiplies the negative ones, of every token
    in the prompt or generated so far.

    The same `seed` gives the same output for the same prompt and routing; None draws one.

    `logprobs` (0 to MAX_LOGPROBS; None = off) returns, with each generated token, its
    log-probability and those of the `logprobs` likeliest tokens, from the model's own
    distribution (log-softmax of the logits, before bias, penalties, temperature and filters).
    `prompt_logprobs` does the same for each prompt token after the first (given the tokens
    before it), and max_tokens=0 then scores the prompt without generating.

    `min_tokens` (vLLM's): until that many tokens are generated, EOS (unless `ignore_eos`) and
    `stop_token_ids` are kept from being sampled (their logits -inf) and stop strings are not
    looked for; a stop string that ends in later text still counts when it began earlier.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    stop: tuple[str, ...] = ()  # stop strings; the output ends before the first one
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # end after the stop string (or stop token's text) instead
    ignore_eos: bool = False  # keep going past EOS (benchmarks with fixed lengths)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise RequestInvalid(f"temperature={self.temperature}; expected >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestInvalid(f"top_p={self.top_p}; expected 0 < top_p <= 1")
        if self.top_k < 0:
            raise RequestInvalid(f"top_k={self.top_k}; expected >= 0 (0 = off)")
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise RequestInvalid(f"max_tokens={self.max_tokens}; expected >= 1 (0 only to score the prompt)")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestInvalid(
                f"min_tokens={self.min_tokens}; expected 0 <= min_tokens <= max_tokens={self.max_tokens}"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestInvalid(f"stop={self.stop!r}; expected non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestInvalid(f"{name}={getattr(self, name)}; expected -2 <= {name} <= 2")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise RequestInvalid(f"repetition_penalty={self.repetition_penalty}; expected 0 < repetition_penalty <= 10")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        bias = {}
        for token, value in pairs:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise RequestInvalid(f"logit_bias key {token!r}; expected a token id >= 0")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
                raise RequestInvalid(f"logit_bias[{token}]={value}; expected -100 <= bias <= 100")
            bias[token] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise RequestInvalid(f"{name}={value}; expected 0 to {MAX_LOGPROBS} (None = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias, a penalty or min_tokens changes the logits before sampling."""
        return (bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or self.min_tokens > 0)


@dataclass
class Request:
    """One generation: a prompt (text, or token ids), how to sample, and how to route its tokens.

    `routing` is a routing spec (BaseSpec, AdapterSpec, MixtureSpec, VocabSpec, GateSpec) or a
    RouterSpec naming a gate router. Adapter names are hot-set keys, passed as they are to the
    engine's `adapter_loader` (versioned keys such as "math@3" are the caller's choice).
    """

    prompt: str | Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    routing: RoutingSpec | RouterSpec = field(default_factory=BaseSpec)
    request_id: str | None = None

    def __post_init__(self):
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position and the likeliest tokens' there (token id,
    log-probability), likeliest first: `SamplingParams.logprobs` (generated tokens) or
    `prompt_logprobs` (prompt tokens) of them."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StreamDelta:
    """New text (and the tokens that produced it) since the previous delta of the request;
    `logprobs` has one entry per token where the request asked for them, else None."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    # With the request's first delta, where it asked for them: None for the first prompt token.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, where the request asked for them
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # one per prompt token, likewise
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class _Stream:
    """Thread-safe queue of deltas (or one exception) from the step thread to one consumer."""

    def __init__(self):
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self.closed = False

    def put(self, item) -> None:
        with self._lock:
            self._items.append(item)
            self._ready.notify_all()
            loop, event = self._loop, self._event
        if loop is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def get(self, timeout: float | None):
        with self._lock:
            if not self._items:
                self._ready.wait(timeout)
            return self._items.popleft() if self._items else None

    def get_nowait(self):
        with self._lock:
            return self._items.popleft() if self._items else None

    async def aget(self):
        with self._lock:
            if self._event is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                self._event.clear()
            await self._event.wait()


class RequestHandle:
    """The caller's end of one request: iterate (sync or async) for deltas, or `result()`."""

    def __init__(self, engine: "Engine", request: Request, stream: _Stream):
        self.engine, self.request, self._stream = engine, request, stream
        self._done = False
        self._text: list[str] = []
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] | None = None if request.sampling.logprobs is None else []
        self._prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self._last: StreamDelta | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def _take(self, item) -> StreamDelta:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._text.append(item.text)
        self._tokens.extend(item.token_ids)
        if self._logprobs is not None and item.logprobs:
            self._logprobs.extend(item.logprobs)
        if item.prompt_logprobs is not None:
            self._prompt_logprobs = item.prompt_logprobs
        self._last = item
        if item.finished:
            self._done = True
        return item

    def __iter__(self):
        return self

    def __next__(self) -> StreamDelta:
        if self._done:
            raise StopIteration
        while True:
            item = self._stream.get_nowait()
            if item is None:
                if self.engine.running_in_background:
                    item = self._stream.get(timeout=0.5)
                else:
                    self.engine.step()  # no step thread: the consumer drives the engine
                    continue
            if item is not None:
                return self._take(item)
            self.engine.check_alive()

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamDelta:
        if self._done:
            raise StopAsyncIteration
        if not self.engine.running_in_background:
            raise RuntimeError("async consumption needs the engine's step thread (Engine(..., background=True))")
        try:
            return self._take(await self._stream.aget())
        except asyncio.CancelledError:
            self.close()
            raise

    def result(self) -> RequestOutput:
        """Consume the rest of the stream and return the whole output."""
        for _ in self:
            pass
        return self.output()

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.output()

    def output(self) -> RequestOutput:
        last = self._last
        return RequestOutput(
            self.request_id,
            "".join(self._text),
            tuple(self._tokens),
            last.prompt_tokens if last else 0,
            last.completion_tokens if last else 0,
            last.finish_reason if last else None,
            None if self._logprobs is None else tuple(self._logprobs),
            self._prompt_logprobs,
            last.cached_tokens if last else 0,
        )

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stop consuming: aborts the request if it is still running."""
        if not self._done:
            self._done = True
            self.engine.abort(self.request_id, self._stream)

    def __del__(self):  # (no lock here: see Engine._drop)
        try:
            if not self._done:
                self._done = True
                self.engine._drop(self.request_id, self._stream)
        except Exception:  # interpreter shutdown: the engine may already be gone
            pass
