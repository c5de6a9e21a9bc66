"""The engine against transformers (+PEFT) generate, and its batching, stops and exits (its sampling:
test_engine_sampling.py).

Most tests run on the demo assets (built once per session under pytest's base temp directory)
with `background=False`, so the consumer drives the steps and the batch composition of every
step is deterministic.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest
import torch

from molora_core.demo import ensure_demo_assets
from molora_core.engine import Engine, EngineConfig, Request, RouterSpec, SamplingParams
from molora_core.errors import AdapterNotFound, CapacityExceeded, RequestInvalid, RouterInvalid
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, GateSpec, MixtureSpec, VocabSpec

PROMPTS = ["Q: What is 12 + 7? A:", "def add_3(x):", "User: Hello! How are you today?\nAssistant:", "Bonjour"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


def make_engine(demo, background=False, **overrides) -> Engine:
    cfg = dict(max_batch=4, max_seq_len=96, prefill_chunk=5, hot_slots=4, max_rank=8, max_queue=16)
    cfg.update(overrides)
    return Engine(
        demo / "model",
        EngineConfig(**cfg),
        adapter_loader=lambda name: load_peft_adapter(demo / "adapters" / name.split("@")[0], name=name),
        router_loader=lambda name: GateRouter.load(demo / "routers" / name),
        background=background,
    )


@pytest.fixture(scope="module")
def engine(demo):
    return make_engine(demo)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def hf_reference(demo, adapter):
    """transformers' model (with PEFT's adapter where one is named), its tokenizer, and our routing spec alike."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    reference = Qwen3ForCausalLM.from_pretrained(demo / "model").eval()
    if adapter:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(reference, str(demo / "adapters" / adapter)).eval()
    return reference, AutoTokenizer.from_pretrained(demo / "model"), AdapterSpec(adapter) if adapter else BaseSpec()


def hf_greedy(model, tokenizer, prompt, n):
    """transformers' greedy tokens, stopping at EOS as our engine does (min_new_tokens would
    instead forbid EOS, a different distribution)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("adapter", [None, "code"])
def test_greedy_equals_transformers_generate(demo, engine, adapter):
    reference, tokenizer, routing = hf_reference(demo, adapter)
    # The long prompt is prefilled in chunks of 5 tokens.
    for prompt in (PROMPTS[0], PROMPTS[2]):
        want = hf_greedy(reference, tokenizer, prompt, 24)
        got = engine.submit(Request(prompt, SamplingParams(max_tokens=24), routing)).result()
        assert list(got.token_ids) == want
        assert got.completion_tokens == len(want)
        assert got.finish_reason == ("stop" if want[-1] == tokenizer.eos_token_id else "length")


def _mixed_requests(demo):
    tokenizer_vocab = 1024
    return [
        Request(PROMPTS[0], greedy(12), AdapterSpec("math")),
        Request(PROMPTS[1], greedy(9), AdapterSpec("code")),
        Request(PROMPTS[2], greedy(14), RouterSpec("demo-gate")),
        Request(PROMPTS[3], greedy(7), BaseSpec()),
        Request(PROMPTS[0], greedy(10), MixtureSpec(("math", "chat"), (0.7, 0.3))),
        Request(PROMPTS[1], greedy(8), VocabSpec(((0, 300, "code"), (300, tokenizer_vocab, "multilingual")))),
        Request(PROMPTS[2], SamplingParams(max_tokens=11, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
                RouterSpec("demo-gate")),
    ]


def test_continuous_batch_of_mixed_routing_equals_each_alone(demo, engine):
    alone = [engine.submit(r).result().token_ids for r in _mixed_requests(demo)]
    # Staggered arrivals: requests join while others are mid-prefill or decoding, 4 at a time.
    handles, requests = [], _mixed_requests(demo)
    for i, request in enumerate(requests):
        handles.append(engine.submit(request))
        for _ in range(i % 3):
            engine.step()
    together = [h.result().token_ids for h in handles]
    assert together == alone
    assert engine.counters.steps > 0 and not engine._running
    assert all(pins == 0 for pins in engine.stats().pinned_adapters.values())


def test_max_tokens_and_eos(engine):
    out = engine.submit(Request(PROMPTS[0], greedy(3))).result()
    assert (out.completion_tokens, out.finish_reason) == (3, "length")
    # The greedy continuation's 4th token declared as end-of-sequence: generation stops on it.
    tokens = engine.submit(Request(PROMPTS[1], greedy(6))).result().token_ids
    eos = tokens[3]
    first = tokens.index(eos)
    out = engine.submit(Request(PROMPTS[1], SamplingParams(max_tokens=6, stop_token_ids=(eos,)))).result()
    assert out.token_ids == tokens[: first + 1] and out.finish_reason == "stop"
    saved = set(engine.eos_ids)
    engine.eos_ids = {eos}
    try:
        out = engine.submit(Request(PROMPTS[1], SamplingParams(max_tokens=6))).result()
    finally:
        engine.eos_ids = saved
    assert out.token_ids == tokens[: first + 1] and out.finish_reason == "stop"


def test_bad_requests_are_refused(engine):
    with pytest.raises(RequestInvalid, match="empty prompt"):
        engine.submit(Request([], greedy(2)))
    with pytest.raises(RequestInvalid, match="max_seq_len"):
        engine.submit(Request([1] * 200, greedy(2)))
    with pytest.raises(RequestInvalid, match="outside the vocabulary"):
        engine.submit(Request([5, 99999], greedy(2)))
    with pytest.raises(RequestInvalid, match="temperature"):
        SamplingParams(temperature=-1)
    first, before = engine.submit(Request(PROMPTS[0], greedy(2), request_id="twice")), engine.stats()
    with pytest.raises(RequestInvalid, match="'twice' is already in use"):
        engine.submit(Request(PROMPTS[1], greedy(2), request_id="twice"))
    after = engine.stats()  # a refused id counts as rejected, as every other refusal does
    assert (after.rejected, after.submitted) == (before.rejected + 1, before.submitted)
    assert first.result().completion_tokens == 2


@pytest.mark.parametrize("flags,warns", [({"avx2", "fma"}, True), ({"avx2", "fma", "avx512_bf16"}, False)])
def test_bf16_cpu_engine_says_where_float32_serves_faster(demo, monkeypatch, caplog, flags, warns):
    """A bf16 engine on a CPU without bf16 dot products logs that fp32 would serve faster (its
    matmuls convert); on one with them it does not. Either way it serves a gate-routed request."""
    from kernels import cpu_ext

    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: frozenset(flags))
    with caplog.at_level(logging.WARNING, logger="molora_core.engine.engine"):
        engine = make_engine(demo, dtype="bfloat16", device="cpu")
    assert engine.model.dtype == torch.bfloat16
    assert any("float32 serves faster" in r.getMessage() for r in caplog.records) == warns
    out = engine.submit(Request(PROMPTS[2], greedy(6), RouterSpec("demo-gate"))).result()
    assert out.completion_tokens == 6 and len(out.token_ids) == 6


def test_cpu_engines_keep_freed_memory(demo, monkeypatch):
    """A CPU engine raises glibc's malloc thresholds once it is built (molora_core.cpu_memory), so
    its prefills stop faulting their temporaries' pages in afresh."""
    from molora_core import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    make_engine(demo, device="cpu").close()
    assert calls == [1]


def test_bad_in_memory_gate_routers_are_refused_at_submit(demo):
    engine = make_engine(demo, max_top_k=2)
    hidden = engine.model.config.hidden_size
    bad_gates = {
        "reads hidden size 8": GateRouter(8, ["code", "math"]),
        "top_k=3 > max_top_k=2": GateRouter(hidden, ["code", "math", "chat"], top_k=3),
        "is on meta; this engine runs on": GateRouter(hidden, ["code", "math"]).to("meta"),
    }
    for message, gate in bad_gates.items():
        with pytest.raises(RouterInvalid, match=message):
            engine.submit(Request([5, 6], greedy(2), GateSpec(gate)))
    assert engine.stats().rejected == len(bad_gates) and engine.stats().submitted == 0
    engine.close()


def test_unknown_adapter_fails_only_that_request(demo):
    def loader(name):
        if name == "nope":
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return load_peft_adapter(demo / "adapters" / name, name=name)

    engine = Engine(demo / "model", EngineConfig(max_batch=2, max_seq_len=64, hot_slots=2, max_rank=8), adapter_loader=loader)
    bad = engine.submit(Request(PROMPTS[0], greedy(4), AdapterSpec("nope")))
    good = engine.submit(Request(PROMPTS[0], greedy(4), AdapterSpec("math")))
    with pytest.raises(AdapterNotFound, match="nope"):
        bad.result()
    assert good.result().completion_tokens == 4
    assert engine.stats().failed == 1


def test_a_removed_adapter_is_loaded_anew_not_from_an_earlier_fetch(demo):
    """A request for `math` that waited on a full hot-set (its background load finished, no slot
    to pin it in) and was aborted leaves that load behind; once `math` is removed (its weights
    replaced), the next request for it calls the loader again and runs on the new weights."""
    source, calls = {"math": "math", "chat": "chat"}, []

    def loader(name):
        calls.append(name)
        return load_peft_adapter(demo / "adapters" / source[name], name=name)

    engine = Engine(demo / "model", EngineConfig(max_batch=4, max_seq_len=96, prefill_chunk=5, hot_slots=1, max_rank=8,
                                                 pin_timeout_s=60), adapter_loader=loader)
    engine.load_adapter("code", load_peft_adapter(demo / "adapters" / "code", name="code"))
    hold = engine.submit(Request(PROMPTS[1], greedy(40), AdapterSpec("code")))  # pins the only slot
    waiting = engine.submit(Request(PROMPTS[0], greedy(4), AdapterSpec("math")))
    deadline = time.monotonic() + 30
    while not (calls and engine.admission._fetches["math"].done()) and time.monotonic() < deadline:
        engine.step()
    engine.abort(waiting.request_id)
    engine.step()
    assert waiting.result().finish_reason == "abort" and calls == ["math"]
    engine.remove_adapter("math")
    source["math"] = "chat"
    hold.result()
    got = engine.submit(Request(PROMPTS[0], greedy(8), AdapterSpec("math"))).result().token_ids
    assert calls == ["math", "math"]
    assert got == engine.submit(Request(PROMPTS[0], greedy(8), AdapterSpec("chat"))).result().token_ids


def test_closing_a_finished_handle_leaves_a_later_request_on_its_id_running(engine):
    """Ids are free again once a request ends: the old handle, closed (or dropped) unread, must
    not abort the new request that took its id."""
    old = engine.submit(Request(PROMPTS[0], greedy(3), request_id="reused"))
    while engine.step():
        pass
    new = engine.submit(Request(PROMPTS[1], greedy(5), request_id="reused"))
    old.close()
    out = new.result()
    assert (out.finish_reason, out.completion_tokens) == ("length", 5)
    other = engine.submit(Request(PROMPTS[1], greedy(50), request_id="reused"))
    engine.step()
    engine.abort("reused")  # by id, from outside a handle: still stops it
    assert other.result().finish_reason == "abort"


def test_an_error_in_one_requests_sampling_or_scoring_fails_that_request_alone(engine, monkeypatch):
    """After the step's forward, what is one request's own (its logit adjustment and sampling,
    its prompt scoring) fails that request only; the others of the step go on, token for token."""
    from molora_core.engine import engine as engine_module
    from molora_core.engine.sampling import LogitAdjust

    want = engine.submit(Request(PROMPTS[1], greedy(6))).result().token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    for target, name, sampling in ((LogitAdjust, "apply", greedy(6, logit_bias={5: 1.0})),
                                   (engine_module, "score_tokens", greedy(6, prompt_logprobs=1))):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, broken)
            doomed = engine.submit(Request(PROMPTS[0], sampling))
            beside = engine.submit(Request(PROMPTS[1], greedy(6)))
            with pytest.raises(RuntimeError, match="broken on purpose"):
                doomed.result()
            assert beside.result().token_ids == want, name
    assert not engine._running and not engine._waiting


def test_queue_full_raises_capacity_exceeded(demo):
    engine = make_engine(demo, max_queue=2)
    handles = [engine.submit(Request(PROMPTS[0], greedy(2))) for _ in range(2)]
    with pytest.raises(CapacityExceeded, match="wait queue is full"):
        engine.submit(Request(PROMPTS[0], greedy(2)))
    assert engine.stats().rejected == 1
    for h in handles:
        h.result()
    engine.submit(Request(PROMPTS[0], greedy(2))).result()  # room again


def _running_ids(engine):
    return [s.request_id for s in engine._running]


def _step_until_running(engine, handle, timeout_s=30.0):
    """Adapters load in the background: step until the request is admitted."""
    deadline = time.monotonic() + timeout_s
    while handle.request_id not in _running_ids(engine) and time.monotonic() < deadline:
        engine.step()
    assert handle.request_id in _running_ids(engine)


def test_pinned_hotset_makes_requests_wait_then_proceed(demo):
    engine = make_engine(demo, hot_slots=1, pin_timeout_s=60)
    first = engine.submit(Request(PROMPTS[1], greedy(6), AdapterSpec("code")))
    engine.step()  # "code" starts loading in the background
    assert _running_ids(engine) == []
    _step_until_running(engine, first)
    second = engine.submit(Request(PROMPTS[0], greedy(6), AdapterSpec("math")))
    base = engine.submit(Request(PROMPTS[3], greedy(3)))  # needs no slot: not held up
    engine.step()
    assert _running_ids(engine) == [first.request_id, base.request_id]
    assert engine.stats().waiting == 1
    first_out = first.result()  # drives steps until "code" is unpinned
    assert first_out.completion_tokens == 6
    _step_until_running(engine, second)
    assert second.result().completion_tokens == 6 and base.result().completion_tokens == 3
    assert engine.stats().hotset_evictions == 1


def test_pinned_hotset_wait_is_bounded(demo):
    engine = make_engine(demo, hot_slots=1, pin_timeout_s=0.05)
    # Resident before the request: the 0.05 s bound below is for "math" alone.
    engine.load_adapter("code", load_peft_adapter(demo / "adapters" / "code", name="code"))
    long = engine.submit(Request(PROMPTS[1], greedy(80), AdapterSpec("code")))
    engine.step()
    assert long.request_id in _running_ids(engine)
    blocked = engine.submit(Request(PROMPTS[0], greedy(4), AdapterSpec("math")))
    engine.step()
    time.sleep(0.06)
    with pytest.raises(CapacityExceeded, match="waited"):
        blocked.result()
    long.close()
    engine.step()
    assert engine.stats().pinned_adapters == {"code": 0}


def test_abort_and_dropped_handles_free_slots_and_pins(demo):
    engine = make_engine(demo, background=True)
    try:
        handle = engine.submit(Request(PROMPTS[0], greedy(80), AdapterSpec("math")))
        deltas = [next(handle), next(handle)]
        engine.abort(handle.request_id)
        rest = list(handle)
        assert rest[-1].finish_reason == "abort" and len(deltas) + len(rest) < 80
        dropped = engine.submit(Request(PROMPTS[1], greedy(80), AdapterSpec("code")))
        next(dropped)
        del dropped  # the consumer went away
        gc.collect()
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats.aborted == 2 and stats.running == 0
        assert all(p == 0 for p in stats.pinned_adapters.values())
        assert engine.kv_slots.available() == 4  # free, or cached for prefix reuse
    finally:
        engine.close()


def test_async_streaming_from_the_step_thread(demo):
    import asyncio

    engine = make_engine(demo, background=True)

    async def consume(request):
        handle = engine.submit(request)
        return [d async for d in handle]

    async def main():
        return await asyncio.gather(*(consume(Request(p, greedy(6), AdapterSpec("chat"))) for p in PROMPTS))

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    sync = make_engine(demo)
    for prompt, deltas in zip(PROMPTS, results):
        assert deltas[-1].finished and deltas[-1].completion_tokens == 6
        want = sync.submit(Request(prompt, greedy(6), AdapterSpec("chat"))).result()
        assert "".join(d.text for d in deltas) == want.text
        assert tuple(t for d in deltas for t in d.token_ids) == want.token_ids
    stats = sync.stats()
    assert stats.tokens_by_adapter["chat"] > 0 and stats.ttft_p50_s is not None and stats.step_p99_s is not None


def test_cold_load_runs_beside_the_batch_not_inside_it(demo):
    """A slow cold load (object storage) must not stall requests that are already decoding."""
    events = {}

    def slow_loader(name):
        events["load_started"] = time.monotonic()
        time.sleep(1.0)
        events["load_done"] = time.monotonic()
        return load_peft_adapter(demo / "adapters" / name, name=name)

    engine = Engine(demo / "model", EngineConfig(max_batch=4, max_seq_len=96, hot_slots=4, max_rank=8),
                    adapter_loader=slow_loader)
    try:
        running = engine.submit(Request(PROMPTS[0], greedy(30)))
        engine.step()  # the base request is admitted and prefilled
        cold = engine.submit(Request(PROMPTS[1], greedy(8), AdapterSpec("code")))
        arrivals = [time.monotonic() for delta in running if delta.token_ids]  # steps run while "code" loads
        assert running.output().completion_tokens == 30
        cold_out = cold.result()
        during = [t for t in arrivals if events["load_started"] < t < events["load_done"]]
        assert len(during) >= 2, "the base request made no progress while the adapter was loading"
    finally:
        engine.close()
    reference = make_engine(demo)
    try:
        (expected,) = reference.generate([Request(PROMPTS[1], greedy(8), AdapterSpec("code"))])
    finally:
        reference.close()
    assert cold_out.token_ids == expected.token_ids
    assert engine.hotset.stats.cold_loads == 1 and engine.hotset.stats.load_seconds >= 1.0


def test_router_load_runs_beside_the_batch_and_failures_reach_only_their_request(demo):
    """A slow gate-router load must not stall decoding requests; a failing one fails only the
    requests that asked for it, and the next request retries it."""
    events, attempts = {}, []

    def slow_router_loader(name):
        attempts.append(name)
        if name == "broken":
            raise OSError("object storage unreachable")
        events["load_started"] = time.monotonic()
        time.sleep(1.0)
        events["load_done"] = time.monotonic()
        return GateRouter.load(demo / "routers" / name)

    engine = Engine(demo / "model", EngineConfig(max_batch=4, max_seq_len=96, hot_slots=4, max_rank=8),
                    adapter_loader=lambda name: load_peft_adapter(demo / "adapters" / name, name=name),
                    router_loader=slow_router_loader)
    try:
        running = engine.submit(Request(PROMPTS[0], greedy(30)))
        engine.step()
        gated = engine.submit(Request(PROMPTS[2], greedy(6), RouterSpec("demo-gate")))
        broken = engine.submit(Request(PROMPTS[1], greedy(6), RouterSpec("broken")))
        assert running.result().completion_tokens == 30
        assert "load_started" in events and "load_done" not in events, "decoding waited for the router load"
        assert gated.result().completion_tokens == 6
        with pytest.raises(OSError, match="unreachable"):
            broken.result()
        again = engine.submit(Request(PROMPTS[1], greedy(2), RouterSpec("broken")))
        with pytest.raises(OSError):
            again.result()
        assert attempts.count("broken") == 2 and attempts.count("demo-gate") == 1
    finally:
        engine.close()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_finished_sequence_leaves_its_kv_slot_zeroed(demo, prefix_caching):
    """Decode attention reads rows past a sequence's length with weight 0; what a former
    occupant left there must be zeros, or an inf / NaN would reach the next request as 0 * NaN.
    With prefix caching the slot keeps its rows until a request that shares none of them needs
    it, and is zeroed then."""
    engine = make_engine(demo, max_batch=2, prefix_caching=prefix_caching)
    overflowed = engine.submit(Request(PROMPTS[2], greedy(12)))
    while engine.counters.generated_tokens < 2:
        engine.step()
    (seq,) = engine._running
    slot = seq.kv_slot
    engine.kv_cache.v[:, slot, :, : seq.num_computed] = float("nan")  # as if it had overflowed
    overflowed.result()
    cleared = not engine.kv_cache.k[:, slot].any() and not engine.kv_cache.v[:, slot].any()
    assert cleared != prefix_caching and engine.kv_slots.cached() == int(prefix_caching)
    # One of the next two requests takes that slot (with prefix caching, the second, evicting
    # it), a short one beside a longer one, so attention reads the former occupant's rows
    # (masked): the tokens must be the clean ones.
    requests = lambda: [Request(PROMPTS[1], greedy(12)), Request(PROMPTS[3], greedy(4))]  # noqa: E731
    handles = [engine.submit(r) for r in requests()]
    engine.step()
    assert slot in {s.kv_slot for s in engine._running}
    got = [h.result().token_ids for h in handles]
    reference = make_engine(demo, prefix_caching=False)
    assert got == [o.token_ids for o in reference.generate(requests())]
    assert engine.kv_slots.cached() == 2 * prefix_caching
    engine.close()
    reference.close()
