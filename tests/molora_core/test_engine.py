"""The engine against transformers (+PEFT) generate, and its batching, sampling, stops and exits.

Most tests run on the demo assets (built once per session under pytest's base temp directory)
with `background=False`, so the consumer drives the steps and the batch composition of every
step is deterministic.
"""

from __future__ import annotations

import functools
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


def test_same_seed_same_output(engine):
    def run(seed, company=0):
        handles = [engine.submit(Request(PROMPTS[3], SamplingParams(max_tokens=8, temperature=1.0, seed=99 + i)))
                   for i in range(company)]
        h = engine.submit(Request(PROMPTS[2], SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=seed, ignore_eos=True)))
        out = h.result().token_ids
        for other in handles:
            other.result()
        return out

    first = run(1)
    assert run(1) == first
    assert run(1, company=3) == first
    assert any(run(seed) != first for seed in (2, 3, 4)), "other seeds must be able to sample otherwise"


class _OpenAIPenalties:
    """A transformers logits processor with OpenAI's presence / frequency penalty formula over
    the tokens generated after the prompt: logits[j] -= c[j] * frequency + (c[j] > 0) * presence."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in zip(scores, input_ids[:, self.prompt_len :]):
            counts = torch.bincount(ids, minlength=scores.shape[-1]).float()
            row -= counts * self.frequency + (counts > 0).float() * self.presence
        return scores


# Prompts whose greedy tokens repeat, so that every case below changes them.
@pytest.mark.parametrize("adapter,prompt", [(None, PROMPTS[0]), ("code", PROMPTS[3])])
def test_logit_bias_and_penalties_equal_transformers_generate(demo, engine, adapter, prompt):
    """logit_bias and repetition_penalty against transformers' own (`sequence_bias`,
    `repetition_penalty`); presence / frequency penalties against transformers greedy with
    OpenAI's formula as a logits processor. The adjusted request
    shares its batch with an unadjusted one, which must still give the plain greedy tokens."""
    from transformers import LogitsProcessorList

    reference, tokenizer, routing = hf_reference(demo, adapter)
    n = 20
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    stop_at_eos = functools.partial(SamplingParams, max_tokens=n)  # as transformers' generate does
    plain = engine.submit(Request(prompt, stop_at_eos(), routing)).result().token_ids
    bias = {plain[1]: -100.0, plain[4]: -3.5, int(ids[0, -1]): 2.0}
    cases = [
        (stop_at_eos(logit_bias=bias), {"sequence_bias": [[[t], b] for t, b in bias.items()]}),
        (stop_at_eos(presence_penalty=0.7, frequency_penalty=1.3),
         {"logits_processor": LogitsProcessorList([_OpenAIPenalties(ids.shape[1], 0.7, 1.3)])}),
        (stop_at_eos(presence_penalty=-1.5),
         {"logits_processor": LogitsProcessorList([_OpenAIPenalties(ids.shape[1], -1.5, 0.0)])}),
        (stop_at_eos(repetition_penalty=1.8), {"repetition_penalty": 1.8}),
        (stop_at_eos(repetition_penalty=0.6), {"repetition_penalty": 0.6}),
    ]
    for sampling, hf_kwargs in cases:
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     **hf_kwargs)
        want = out[0, ids.shape[1] :].tolist()
        assert want != list(plain), f"{hf_kwargs} must change the greedy tokens for this test to tell"
        adjusted = engine.submit(Request(prompt, sampling, routing))
        beside = engine.submit(Request(prompt, stop_at_eos(), routing))
        assert list(adjusted.result().token_ids) == want
        assert beside.result().token_ids == plain


@pytest.mark.parametrize("adapter", [None, "math"])
def test_logprobs_equal_transformers_log_softmax(demo, engine, adapter):
    """Each generated token's log-probability and its top alternatives equal log_softmax of
    transformers' raw logits at that step (the model's distribution: before the request's
    logit_bias, which here changes the tokens), streamed deltas included."""
    reference, tokenizer, routing = hf_reference(demo, adapter)
    prompt, n, top = PROMPTS[2], 12, 5
    plain = engine.submit(Request(prompt, greedy(n), routing)).result().token_ids
    sampling = greedy(n, logprobs=top, logit_bias={plain[2]: -100})
    handle = engine.submit(Request(prompt, sampling, routing))
    streamed = [lp for delta in handle for lp in delta.logprobs]
    out = handle.output()
    assert out.logprobs == tuple(streamed) and len(streamed) == len(out.token_ids) == n
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = reference(torch.cat([ids, torch.tensor([out.token_ids])], dim=1)).logits[0, ids.shape[1] - 1 : -1]
    want = torch.log_softmax(logits.float(), dim=-1)
    assert out.token_ids != plain  # the bias changed the tokens, not the reported distribution
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(want[step, lp.token_id].item(), abs=1e-4)
        values, top_ids = torch.topk(want[step], top)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert engine.submit(Request(prompt, greedy(2), routing)).result().logprobs is None
    only_chosen = engine.submit(Request(prompt, greedy(2, logprobs=0), routing)).result().logprobs
    assert [lp.top for lp in only_chosen] == [(), ()]


@pytest.mark.parametrize("adapter", [None, "code"])
def test_prompt_logprobs_equal_transformers_log_softmax(demo, engine, adapter):
    """Each prompt token's log-probability given the tokens before it (the prompt prefilled in
    chunks of 5, so scored across chunk boundaries) and its top alternatives equal log_softmax of
    transformers' logits; max_tokens=0 scores the prompt and generates nothing, and a request
    beside it in the batch still gets its plain greedy tokens."""
    reference, tokenizer, routing = hf_reference(demo, adapter)
    prompt, top = PROMPTS[2], 3
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    plain = engine.submit(Request(PROMPTS[0], greedy(6), routing)).result().token_ids
    scored = engine.submit(Request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=top), routing))
    beside = engine.submit(Request(PROMPTS[0], greedy(6), routing))
    out = scored.result()
    assert (out.token_ids, out.completion_tokens, out.finish_reason, out.logprobs) == ((), 0, "length", None)
    assert len(out.prompt_logprobs) == len(ids) > 10 and out.prompt_logprobs[0] is None
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[i]
        assert lp.logprob == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        values, top_ids = torch.topk(want[i - 1], top)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert beside.result().token_ids == plain
    both = engine.submit(Request(prompt, greedy(4, logprobs=0, prompt_logprobs=0), routing)).result()
    assert [lp.logprob for lp in both.prompt_logprobs[1:]] == [lp.logprob for lp in out.prompt_logprobs[1:]]
    assert len(both.token_ids) == len(both.logprobs) == 4
    with pytest.raises(RequestInvalid, match="max_tokens=0"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize("adapter,prompt", [(None, PROMPTS[0]), ("code", PROMPTS[1])])
def test_min_tokens_equals_transformers_min_new_tokens(demo, engine, adapter, prompt):
    """min_tokens keeps EOS and stop_token_ids from being sampled until that many tokens are out,
    as transformers' `min_new_tokens` does for its eos_token_id list; past it they end the output
    again. Each case asserts that min_tokens changes the tokens."""
    reference, tokenizer, routing = hf_reference(demo, adapter)
    n = 20
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    plain = engine.submit(Request(prompt, SamplingParams(max_tokens=n), routing)).result().token_ids
    i = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])  # a token first seen at i
    cases = [(SamplingParams(max_tokens=n, min_tokens=len(plain) + 3), list(engine.eos_ids), len(plain)),
             (SamplingParams(max_tokens=n, min_tokens=i + 2, stop_token_ids=(plain[i],)),
              [plain[i], *engine.eos_ids], i + 1)]
    for sampling, ends, unheld in cases:
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=n, min_new_tokens=sampling.min_tokens, do_sample=False,
                                     eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        want = out[0, ids.shape[1] :].tolist()
        assert len(want) >= sampling.min_tokens > unheld, "min_tokens must hold an end back for this test to tell"
        got = engine.submit(Request(prompt, sampling, routing)).result()
        assert list(got.token_ids) == want
        assert got.finish_reason == ("stop" if want[-1] in ends else "length")
    with pytest.raises(RequestInvalid, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(RequestInvalid, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def test_min_tokens_looks_for_stop_strings_from_its_last_token_on(engine):
    """Until min_tokens tokens are out no stop string ends the output; from the min_tokens-th
    token on, a stop string counts where it ends in new text, even if it began earlier (vLLM's
    rule), each string in its own window. The plain text here, token by token: ' I', ' am',
    ' doing', ' well', ',', ' thank', ..."""
    plain = engine.submit(Request(PROMPTS[2], greedy(16))).result().text
    assert plain.startswith(" I am doing well, thank you for asking. How can I help you?")
    cases = [  # stop strings, the text without min_tokens, and with min_tokens=6
        (("doing",), " I am ", plain, "length"),  # in the first five tokens' text only
        (("l, th",), " I am doing wel", " I am doing wel", "stop"),  # begins there, ends in the sixth token
        (("thank",), " I am doing well, ", " I am doing well, ", "stop"),  # the sixth token itself
        ((",", "?", "xyzzyq"), " I am doing well", plain[: plain.index("?")], "stop"),  # "," is old, "?" new
    ]
    for stop, unheld, text, reason in cases:
        assert engine.submit(Request(PROMPTS[2], greedy(16, stop=stop))).result().text == unheld
        handle = engine.submit(Request(PROMPTS[2], greedy(16, stop=stop, min_tokens=6)))
        streamed = "".join(delta.text for delta in handle)
        out = handle.output()
        assert (out.text, streamed, out.finish_reason) == (text, text, reason), stop


def test_logit_bias_forces_and_bans_tokens_when_sampling(engine):
    forced = engine.submit(Request(PROMPTS[0], greedy(6, temperature=1.0, seed=5, logit_bias={42: 100}))).result()
    assert forced.token_ids == (42,) * 6
    sampled = engine.submit(Request(PROMPTS[0], greedy(12, temperature=1.5, seed=5))).result().token_ids
    banned = {t: -100 for t in set(sampled)}
    other = engine.submit(Request(PROMPTS[0], greedy(12, temperature=1.5, seed=5, logit_bias=banned))).result()
    assert not set(other.token_ids) & set(banned)


def test_bad_sampling_adjustments_are_refused(engine):
    with pytest.raises(RequestInvalid, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(RequestInvalid, match="frequency_penalty"):
        SamplingParams(frequency_penalty=float("nan"))
    with pytest.raises(RequestInvalid, match="logit_bias"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(RequestInvalid, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(RequestInvalid, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(RequestInvalid, match="logit_bias key"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(RequestInvalid, match="logit_bias token ids \\[99999\\]"):
        engine.submit(Request(PROMPTS[0], greedy(2, logit_bias={99999: 1.0})))
    assert not engine._waiting and not engine._running


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    want = engine.submit(Request(PROMPTS[0], greedy(10))).result().token_ids
    assert engine.submit(Request(PROMPTS[0], greedy(10, temperature=1.5, top_k=1, seed=3))).result().token_ids == want
    assert engine.submit(Request(PROMPTS[0], greedy(10, temperature=1.5, top_p=1e-6, seed=3))).result().token_ids == want


def test_stop_string_ends_the_output_before_it(engine):
    full = engine.submit(Request(PROMPTS[2], greedy(30))).result().text
    stop = full[5:8]
    assert len(stop) == 3 and stop in full
    handle = engine.submit(Request(PROMPTS[2], greedy(30, stop=(stop, "never-appears"))))
    deltas = [d.text for d in handle]
    out = handle.output()
    assert out.text == full[: full.index(stop)]
    assert "".join(deltas) == out.text
    assert out.finish_reason == "stop" and out.completion_tokens < 30


def test_include_stop_str_in_output_ends_after_the_stop(engine):
    """vLLM's include_stop_str_in_output: the text ends after the first stop string, streamed
    alike (of two strings that begin at one place and arrive in one token, the shorter); a stop
    token's text stays in it."""
    plain = engine.submit(Request(PROMPTS[2], greedy(30))).result()
    text = plain.text
    assert text.startswith(" I am doing")  # " doing" is one token: " d" and " doi" arrive together
    for stop, end in (((text[5:8], "never-appears"), text.index(text[5:8]) + 3), ((" doi", " d"), 7)):
        handle = engine.submit(Request(PROMPTS[2], greedy(30, stop=stop, include_stop_str_in_output=True)))
        deltas = [d.text for d in handle]
        out = handle.output()
        assert (out.text, "".join(deltas), out.finish_reason) == (text[:end], text[:end], "stop"), stop
    first = plain.token_ids.index(plain.token_ids[3])
    sampling = SamplingParams(max_tokens=30, stop_token_ids=(plain.token_ids[3],), include_stop_str_in_output=True)
    out = engine.submit(Request(PROMPTS[2], sampling)).result()
    assert out.token_ids == plain.token_ids[: first + 1]
    before = engine.tokenizer.decode(plain.token_ids[:first])
    assert out.text == engine.tokenizer.decode(plain.token_ids[: first + 1]) and len(out.text) > len(before)


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
        assert sorted(engine._free_kv) == list(range(4))
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
        base_out = running.result()  # drives the steps while "code" loads in the background
        events["base_done"] = time.monotonic()
        assert base_out.completion_tokens == 30
        cold_out = cold.result()
        assert events["load_started"] < events["base_done"] < events["load_done"], (
            "the base request finished while the adapter was still loading"
        )
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


def test_a_finished_sequence_leaves_its_kv_slot_zeroed(demo):
    """Decode attention reads rows past a sequence's length with weight 0; what a former
    occupant left there must be zeros, or an inf / NaN would reach the next request as 0 * NaN."""
    engine = make_engine(demo)
    overflowed = engine.submit(Request(PROMPTS[2], greedy(12)))
    while engine.counters.generated_tokens < 2:
        engine.step()
    (seq,) = engine._running
    slot = seq.kv_slot
    engine.kv_cache.v[:, slot, :, : seq.num_computed] = float("nan")  # as if it had overflowed
    overflowed.result()
    assert not engine.kv_cache.k[:, slot].any() and not engine.kv_cache.v[:, slot].any()
    # The next short request takes that slot while a longer one decodes beside it, so its
    # attention reads the former occupant's rows (masked): its tokens must be the clean ones.
    requests = lambda: [Request(PROMPTS[1], greedy(6)), Request(PROMPTS[2], greedy(6))]  # noqa: E731
    got = [o.token_ids for o in engine.generate(requests())]
    reference = make_engine(demo)
    assert got == [o.token_ids for o in reference.generate(requests())]
    engine.close()
    reference.close()
