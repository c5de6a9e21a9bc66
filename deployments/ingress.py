"""The HTTP ingress: OpenAI-compatible generation, the registry API, /v1/models, /healthz, /metrics.

    GET  /v1/models                 base model, adapters, routers (as 'molora:<router>')
    POST /v1/completions            prompt -> text; stream=true for server-sent events
    POST /v1/chat/completions       messages -> assistant message; stream=true for SSE
    *    /v1/adapters, /v1/routers  the registry's routes (adapter_store.routes)
    GET  /healthz                   200 when the registry answers, else 503
    GET  /metrics                   Prometheus text format

The ingress resolves `model` against the registry (deployments.resolve), sends the request to a
model replica through the adapter-affinity request router (one call per choice, for `n`), and
turns the replicas' streams into OpenAI bodies or SSE chunks. Every error is `{"error": {message,
type, param, code}}`; the replicas that served a request are named in the `x-molora-replica`
response header.
"""

# No `from __future__ import annotations`: Serve rebuilds the methods' signatures for FastAPI,
# which must see `Request` as a class, not a string.
import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store import build_registry_router
from adapter_store.errors import StoreError
from deployments.bootstrap import open_store
from deployments.config import AppConfig
from deployments.errors import ApiError, bad_request, classify, overloaded, unavailable
from deployments.metrics import IngressMetrics
from deployments.openai_models import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from deployments.placement import PlacementController
from deployments.replica import stats_key
from deployments.resolve import ROUTER_PREFIX, Resolver

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-molora-replica"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions when max_tokens is unset
MAX_BODY_BYTES = 4 << 20
# Serve counts a call as queued until its router has placed it, so a burst of calls (a batch of
# prompts fans out at once) can see a full queue while the replicas have room: such a call is
# tried again for up to this long (backing off from 20 ms) before its request is answered 429.
# (Placing a call takes the router a queue-length probe of a replica or two: on a loaded 2-core
# machine, up to a few hundred ms.) Serve's count of a replica's calls can also lag, so a call
# may reach an engine whose own wait queue is full: that refusal (before anything ran) is tried
# again alike.
BACKPRESSURE_RETRY_S = 1.0
# A \u escape of a UTF-16 surrogate: JSON allows a lone one, which no tokenizer (nor Redis) takes.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

app = FastAPI(title="MoLoRA Serve", description="OpenAI-compatible API over one base model and many LoRA adapters.")


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(StoreError)
async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
    return _error_response(classify(exc))


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(_validation(list(exc.errors())))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(exc.status_code, str(exc.detail), kind, f"http_{exc.status_code}"))


def _validation(errors: list[dict]) -> ApiError:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    got = first.get("input")
    return bad_request(f"{param or 'request'}: {first.get('msg', 'invalid')} (got {got!r})", param)


def _ray_error(exc: BaseException) -> ApiError:
    if isinstance(exc, BackPressureError):
        return overloaded(f"every model replica's queue is full: {exc}")
    return unavailable(f"the model replica failed: {type(exc).__name__}: {exc}")


def _encodable(data) -> bool:
    """Whether every string of parsed JSON is valid Unicode (encodes as UTF-8)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens the replica's prefix cache served."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _item_usage(item: dict) -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens of a replica's delta item."""
    return item["prompt_tokens"], item["completion_tokens"], item.get("cached_tokens", 0)


def _completion_logprobs(items: list, offset: int) -> tuple[dict, int]:
    """The completions API's `logprobs` object for [token, logprob, alternatives(, shown)] items,
    the first token's text starting at `offset` of the completion; and the offset after them
    (each item moves it by `shown`, the characters its token adds to the text, else its length).
    Each top_logprobs entry holds the alternatives and the chosen token, as OpenAI's does; an
    echoed prompt's first token has None for both."""
    offsets = []
    for token, *rest in items:
        offsets.append(offset)
        offset += rest[2] if len(rest) > 2 else len(token)
    return {
        "tokens": [token for token, *_ in items],
        "token_logprobs": [logprob for _, logprob, *_ in items],
        "top_logprobs": [None if logprob is None else {**dict(alternatives), token: logprob}
                         for token, logprob, alternatives, *_ in items],
        "text_offset": offsets,
    }, offset


def _chat_logprobs(items: list) -> dict:
    """The chat API's `logprobs` object (`content`: token, logprob, UTF-8 bytes, top_logprobs)."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(*alt) for alt in alternatives]}
                        for token, logprob, alternatives, *_ in items], "refusal": None}


def _choice_payload(payload: dict, index: int, choice: int, calls: int, prompt=None) -> dict:
    """The replica payload of call `index` of `calls`: its prompt where a batch gives one, and
    (with more than one call) its own request id and, where the request is seeded, seed + its
    choice number among its prompt's n."""
    out = payload if prompt is None else {**payload, "prompt": prompt}
    if calls == 1:
        return out
    sampling = dict(payload["sampling"])
    if sampling["seed"] is not None:
        sampling["seed"] = (sampling["seed"] + choice) % (1 << 63)
    return {**out, "request_id": f"{payload['request_id']}-{index}", "sampling": sampling}


def _cancel(streams: list) -> None:
    """Cancel replica calls, best effort: their engines abort the requests. (A call that never
    reached a replica raises its own error, BackPressureError say, from `cancel`: ignored.)"""
    for stream in streams:
        try:
            stream.cancel()
        except Exception as exc:
            log.debug("cancelling a replica call: %s: %s", type(exc).__name__, exc)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@serve.ingress(app)
class Ingress:
    """Serve deployment class; `deployments.app` binds it to the ModelReplica handle and config."""

    backpressure_retry_s = BACKPRESSURE_RETRY_S

    def __init__(self, replica: DeploymentHandle, config: dict, placement_interval_s: float = 5.0):
        cfg = AppConfig.model_validate(config)
        self.cfg = cfg
        self.base_model = cfg.model_name
        self.store = open_store(cfg, Path(cfg.model_path))
        self.registry = self.store.registry
        self.resolver = Resolver(self.registry, self.base_model)
        self.replica = replica.options(stream=True)
        self.replica_unary = replica  # calls that answer once (tokenize, detokenize)
        self.metrics = IngressMetrics()
        app.include_router(build_registry_router(self.registry, api_key=cfg.api_key))
        self.placement = PlacementController(self.registry, self.store.settings.namespace, placement_interval_s)
        self.placement.start()
        # Blobs a crashed registration or delete left behind are reclaimed in the background
        # (after a delete too); the claims in adapter_store/blob_gc.py keep concurrent ingresses safe.
        self.registry.collector.request()

    # -- plain routes ----------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await run_in_threadpool(self.registry.ping)
        except StoreError as exc:
            return _error_response(classify(exc))
        return JSONResponse({"status": "ok", "model": self.base_model})

    def _model_entry(self, kind: str, m, model_id: str | None = None) -> dict:
        """An OpenAI model object; `model_id` where the caller named one (a pinned version)."""
        if kind == "base":
            return {"id": self.base_model, "object": "model", "created": 0, "owned_by": "molora", "kind": "base"}
        entry = {"id": model_id or (m.name if kind == "adapter" else f"{ROUTER_PREFIX}{m.name}"), "object": "model",
                 "created": int(m.created_at), "owned_by": "molora", "kind": kind, "version": m.version,
                 "parent": self.base_model}
        if kind == "router":
            entry["adapters"] = list(m.adapters)
        return entry

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        def collect():
            data = [self._model_entry("base", None)]
            for page_of, kind in ((self.registry.list_adapters, "adapter"), (self.registry.list_routers, "router")):
                cursor = None
                while True:
                    page = page_of(limit=1000, cursor=cursor)
                    data += [self._model_entry(kind, m) for m in page.items]
                    cursor = page.next_cursor
                    if cursor is None:
                        break
            return data

        return JSONResponse({"object": "list", "data": await run_in_threadpool(collect)})

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(self, model_id: str) -> JSONResponse:
        kind, m = await run_in_threadpool(self.resolver.manifest, model_id)
        return JSONResponse(self._model_entry(kind, m, model_id))

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        def replica_records():
            client, pattern = self.registry.client, stats_key(self.store.settings.namespace, "*")
            keys = sorted(client.scan_iter(match=pattern, count=1000))
            return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []

        try:
            records = await run_in_threadpool(replica_records)
        except Exception:  # Redis down: still report what the ingress knows
            records = []
        return PlainTextResponse(self.metrics.render(records), media_type="text/plain; version=0.0.4")

    # -- generation ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve("completions", request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve("chat", request, ChatCompletionRequest)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._serve("tokenize", request, TokenizeRequest)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._serve("detokenize", request, DetokenizeRequest)

    async def _serve(self, route: str, request: Request, model: type):
        try:
            body = await self._parse(request, model)
            if route in ("tokenize", "detokenize"):
                response = await self._tokens(route, body)
            else:
                response = await self._generate(route, body)
        except Exception as exc:
            err = exc if isinstance(exc, ApiError) else classify(exc)
            self.metrics.request(route, err.status)
            return _error_response(err)
        self.metrics.request(route, response.status_code)
        return response

    @staticmethod
    async def _parse(request: Request, model: type):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {len(raw)} bytes is over {MAX_BODY_BYTES}", code="body_too_large")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise bad_request("request body is not valid JSON: nested too deeply", code="invalid_json") from None
        if _SURROGATE_ESCAPE.search(raw) and not _encodable(data):
            raise bad_request("request body has a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair) in a "
                              "string; expected valid Unicode text", code="invalid_json")
        if not isinstance(data, dict):
            raise bad_request(f"request body is a JSON {type(data).__name__}, expected an object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _validation(exc.errors()) from None

    async def _tokens(self, route: str, body) -> JSONResponse:
        """One replica call: any replica holds the tokenizer. An unknown model is a 404, as for
        generation."""
        await run_in_threadpool(self.resolver.manifest, body.model)
        try:
            result = await getattr(self.replica_unary, route).remote(body.payload())
        except Exception as exc:
            raise _ray_error(exc) from None
        if result["type"] == "error":
            raise ApiError.from_item(result)
        return JSONResponse({key: value for key, value in result.items() if key != "type"})

    async def _start(self, payloads: list[dict]) -> tuple[list, list]:
        """One replica call per payload, each to its first item (a BackPressureError, or an
        engine's full wait queue, retried for up to BACKPRESSURE_RETRY_S). If any fails, the
        others are stopped and cancelled too."""
        streams: list = [None] * len(payloads)

        async def first(i: int):
            delay, deadline = 0.02, time.monotonic() + self.backpressure_retry_s
            while True:
                streams[i] = self.replica.generate.remote(payloads[i])
                try:
                    item = await streams[i].__anext__()
                except BackPressureError:
                    if time.monotonic() + delay > deadline:
                        raise
                else:
                    full = item.get("type") == "error" and item.get("code") == "overloaded"
                    if not full or time.monotonic() + delay > deadline:
                        return item
                await asyncio.sleep(delay)
                delay *= 2

        tasks = [asyncio.create_task(first(i)) for i in range(len(payloads))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = [t for t in tasks if not t.done() or t.cancelled() or t.exception() is not None]
            if failed:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                _cancel([s for s in streams if s is not None])
        if failed:
            exc = next((t.exception() for t in failed if not t.cancelled() and t.exception() is not None), None)
            raise _ray_error(exc) if exc is not None else asyncio.CancelledError()
        return streams, [t.result() for t in tasks]

    async def _generate(self, route: str, body):
        started = time.monotonic()
        routing = await run_in_threadpool(self.resolver.resolve, body.model, body.adapters)
        rid = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        payload = {"request_id": rid, "routing": routing.payload(),
                   "sampling": body.sampling_fields(DEFAULT_MAX_TOKENS)}
        if route == "chat":
            payload["messages"] = body.message_dicts()
            prompts = [None]
        else:
            payload["echo"] = body.echo
            prompts = body.prompts()
        # One replica call per prompt and choice, choice j of prompt p at index p * n + j (OpenAI's
        # order); choice j samples with seed + j, so n seeded choices differ and repeat run to run.
        n, calls = body.n, len(prompts) * body.n
        streams, firsts = await self._start([_choice_payload(payload, p * n + j, j, calls, prompt)
                                             for p, prompt in enumerate(prompts) for j in range(n)])
        for index, first in enumerate(firsts):
            if first["type"] == "error":
                _cancel(streams)
                err = ApiError.from_item(first)
                if len(prompts) > 1 and err.status == 400:  # name the batch's prompt at fault
                    err.message, err.param = f"prompt[{index // n}]: {err.message}", err.param or "prompt"
                raise err
        headers = {REPLICA_HEADER: ",".join(dict.fromkeys(first["replica"] for first in firsts))}
        meta = {"id": rid, "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(self._events(route, body, meta, streams, started), headers=headers,
                                     media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._collect(stream, started)) for stream in streams]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((task for task in tasks if task.done() and task.exception()), None)
            if failed is not None:
                raise failed.exception()
        except BaseException:  # a choice failed, or the client went away: stop the others
            for task, stream in zip(tasks, streams):
                if not task.done():
                    task.cancel()
                    _cancel([stream])
            raise
        outs = [task.result() for task in tasks]
        wanted = body.top_logprobs_wanted() is not None
        choices = []
        for i, (text, finish, usage, logprobs) in enumerate(outs):
            if finish == "abort":
                raise unavailable("the request was aborted by the model replica (shutting down?)")
            if route == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                                "logprobs": _chat_logprobs(logprobs) if wanted else None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish,
                                "logprobs": _completion_logprobs(logprobs, 0)[0] if wanted else None})
        prompts = outs[::n]  # each prompt once
        usage = (sum(out[2][0] for out in prompts), sum(out[2][1] for out in outs), sum(out[2][2] for out in prompts))
        self.metrics.finished(usage[0], time.monotonic() - started)
        body_json = {**meta, "object": "chat.completion" if route == "chat" else "text_completion",
                     "choices": choices, "usage": _usage(*usage)}
        return JSONResponse(body_json, headers=headers)

    async def _collect(self, stream, started: float) -> tuple[str, str | None, tuple[int, int, int], list]:
        """One choice's whole output: (text, finish reason, (prompt, completion, cached prompt) tokens,
        logprob items)."""
        text, finish, usage, logprobs = [], None, (0, 0, 0), []
        try:
            async for item in stream:
                if item["type"] == "error":
                    raise ApiError.from_item(item)
                self._observe(item)
                if item["type"] == "delta":
                    if not text and item["tokens"]:
                        self.metrics.first_token(time.monotonic() - started)
                    if "echo" in item:
                        text.append(item["echo"])
                        logprobs += item.get("prompt_logprobs") or []
                    text.append(item["text"])
                    logprobs += item.get("logprobs") or []
                    finish, usage = item["finish_reason"], _item_usage(item)
        except ApiError:
            raise
        except Exception as exc:
            raise _ray_error(exc) from None
        return "".join(text), finish, usage, logprobs

    def _observe(self, item: dict) -> None:
        if item["type"] == "delta" and item["tokens"]:
            self.metrics.generated(item["tokens"])

    async def _events(self, route: str, body, meta: dict, streams: list, started: float):
        """Server-sent events of every choice's stream, merged as their items arrive."""
        chat = route == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = len(streams)
        usage, last = [(0, 0, 0)] * n, [None] * n
        wanted = body.top_logprobs_wanted() is not None
        # Per choice: log-probabilities of tokens whose text has not gone out yet, and the text offset.
        pending, offset = [[] for _ in range(n)], [0] * n

        def chunk(i: int, content: str | None, finish, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": content} if role else ({"content": content} if content else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
                if wanted and not role:
                    choice["logprobs"] = _chat_logprobs(pending[i])
            else:
                logprobs = None
                if wanted:
                    logprobs, offset[i] = _completion_logprobs(pending[i], offset[i])
                choice = {"index": i, "text": content or "", "finish_reason": finish, "logprobs": logprobs}
            if not role:
                pending[i] = []
            if body.continuous_usage:  # (the role chunk goes out with the first item: no completion yet)
                prompt, completion, cached = usage[i]
                return {**meta, "object": obj, "choices": [choice], "usage": _usage(prompt, 0 if role else completion,
                                                                                    cached)}
            return {**meta, "object": obj, "choices": [choice]}

        queue: asyncio.Queue = asyncio.Queue()

        ended = [False] * n

        async def pump(i: int, stream) -> None:
            try:
                async for item in stream:
                    await queue.put((i, item))
                await queue.put((i, None))
            except Exception as exc:  # the replica died mid-stream
                await queue.put((i, exc))
            ended[i] = True

        tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
        try:
            # The role chunks go out at once; with continuous usage stats each waits for its
            # choice's first item, which counts the prompt (as vLLM's does).
            role_due = [chat] * n
            if chat and not body.continuous_usage:
                for i in range(n):
                    yield _sse(chunk(i, "", None, role=True))
                role_due = [False] * n
            running = n
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):  # end this stream with an error event
                    yield _sse(_ray_error(item).body())
                    return
                if item["type"] == "error":
                    yield _sse(ApiError.from_item(item).body())
                    return
                if item["type"] != "delta":
                    continue
                now = time.monotonic()
                if item["tokens"]:
                    self.metrics.generated(item["tokens"])
                    if last[i] is None:
                        self.metrics.first_token(now - started)
                    else:
                        self.metrics.inter_token(now - last[i])
                    last[i] = now
                usage[i] = _item_usage(item)
                if role_due[i]:
                    role_due[i] = False
                    yield _sse(chunk(i, "", None, role=True))
                if "echo" in item:
                    pending[i] += item.get("prompt_logprobs") or []
                    yield _sse(chunk(i, item["echo"], None))
                pending[i] += item.get("logprobs") or []
                finish = item["finish_reason"]
                if finish == "abort":
                    yield _sse(unavailable("the request was aborted by the model replica").body())
                    return
                if item["text"] or finish:
                    yield _sse(chunk(i, item["text"], finish))
            prompts = usage[:: body.n]  # each prompt once
            total = (sum(u[0] for u in prompts), sum(u[1] for u in usage), sum(u[2] for u in prompts))
            self.metrics.finished(total[0], time.monotonic() - started)
            if body.include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(*total)})
            yield "data: [DONE]\n\n"
        finally:  # done, failed, or the client went away: stop what still runs
            for task, stream, over in zip(tasks, streams, ended):
                if not over:
                    task.cancel()
                    _cancel([stream])
