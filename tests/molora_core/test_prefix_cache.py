"""Prefix caching (molora_core.engine.kv_slots): a request starts after the prompt tokens whose
keys and values a finished or running request computed under the same routing. The tokens must
be what transformers (+PEFT) generate from the whole prompt, and what an engine without the
cache gives; the counts show the reuse happened, and only where the routing allows it.
"""

from __future__ import annotations

import pytest
import torch

from molora_core.engine import Request, RouterSpec, SamplingParams
from molora_core.engine.kv_slots import common_prefix
from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, GateSpec, MixtureSpec, VocabSpec
from tests.molora_core.test_engine import PROMPTS, demo, greedy, hf_reference, make_engine  # noqa: F401

LONG = PROMPTS[2] + " I am fine, thank you. And what did you do over the weekend?"


def _run(engine, request):
    """Drive the (foreground) engine until `request` is done; its output."""
    return engine.submit(request).result()


def _hf_greedy_ids(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize(
    "a, b, limit, want",
    [([], [1], 5, 0), ([1, 2, 3], [2, 2, 3], 5, 0), ([1, 2, 3], [1, 2, 3], 5, 3), ([1, 2, 3], [1, 2, 3], 2, 2),
     ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9], 9, 4), ([1, 2], [1, 2, 3, 4], 9, 2),
     (list(range(100)) + [1], list(range(100)) + [2], 500, 100), ([5, 1], [5, 2], 9, 1)],
)
def test_common_prefix(a, b, limit, want):
    assert common_prefix(a, b, limit) == want == common_prefix(b, a, limit)


@pytest.mark.parametrize("adapter", [None, "code"])
def test_a_follow_up_turn_starts_after_the_finished_turn(demo, adapter):
    """A second turn whose prompt is the first turn's prompt and answer plus more text (a chat)
    takes the first turn's cached slot as it is and computes only the new tokens."""
    reference, tokenizer, routing = hf_reference(demo, adapter)
    engine = make_engine(demo)
    first = _run(engine, Request(LONG, greedy(10), routing))
    ids = tokenizer(LONG)["input_ids"] + list(first.token_ids) + tokenizer(" Tell me more.")["input_ids"]
    second = _run(engine, Request(ids, SamplingParams(max_tokens=12), routing))  # (stops at EOS, as generate)
    # Cached: the first turn's prompt and all its answer but the last token, never run.
    assert second.cached_tokens == len(tokenizer(LONG)["input_ids"]) + 10 - 1
    assert engine.stats().prefix_hits == 1
    assert list(second.token_ids) == _hf_greedy_ids(reference, ids, 12)
    engine.close()


def test_choices_of_one_prompt_compute_it_once(demo):
    """Requests with one prompt submitted together (an n > 1 request): one computes the prompt,
    in chunks, and the others copy its rows once it has, then run its last token themselves."""
    engine = make_engine(demo, prefill_chunk=5)
    plain = make_engine(demo, prefix_caching=False)
    n_prompt = len(engine.tokenizer(LONG)["input_ids"])
    requests = lambda: [  # noqa: E731
        Request(LONG, SamplingParams(max_tokens=8, temperature=0.9, seed=seed, ignore_eos=True), AdapterSpec("code"))
        for seed in (1, 2, 3)
    ]
    got = engine.generate(requests())
    want = plain.generate(requests())
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.cached_tokens for o in got] == [0, n_prompt - 1, n_prompt - 1]
    # Step tokens on the adapter: the prompt once plus one token for each follower, then decodes.
    assert engine.counters.tokens_by_adapter["code"] == n_prompt + 2 + 3 * 7
    assert plain.counters.tokens_by_adapter["code"] == 3 * n_prompt + 3 * 7
    engine.close()
    plain.close()


def test_only_the_same_routing_shares(demo):
    engine = make_engine(demo, max_batch=8)
    plain = make_engine(demo, max_batch=8, prefix_caching=False)
    vocab = VocabSpec(((0, 300, "code"), (300, 1024, "multilingual")))
    order = [AdapterSpec("math"), AdapterSpec("code"), BaseSpec(), MixtureSpec(("math", "chat"), (0.7, 0.3)),
             MixtureSpec(("math", "chat"), (0.5, 0.5)), vocab, RouterSpec("demo-gate")]
    for routing in order:  # every one a miss: each routing computes its own keys and values
        out = _run(engine, Request(LONG, greedy(6), routing))
        assert out.cached_tokens == 0, routing
        assert out.token_ids == _run(plain, Request(LONG, greedy(6), routing)).token_ids
    assert engine.stats().prefix_hits == 0 and engine.kv_slots.cached() == 7
    for routing in order:  # and now each a hit, on its own
        out = _run(engine, Request(LONG + " Again.", greedy(6), routing))
        assert out.cached_tokens > 10, routing
        assert out.token_ids == _run(plain, Request(LONG + " Again.", greedy(6), routing)).token_ids
    assert engine.stats().prefix_hits == len(order)
    engine.close()
    plain.close()


def test_an_adapter_loaded_again_does_not_share_the_old_rows(demo):
    """Keys and values hold the adapter's weights: once its hot-set slot is loaded again, the
    rows computed with the old load are not reused, even under the same name."""
    engine = make_engine(demo)
    _run(engine, Request(LONG, greedy(4), AdapterSpec("math")))
    engine.remove_adapter("math")
    again = _run(engine, Request(LONG, greedy(4), AdapterSpec("math")))
    assert again.cached_tokens == 0
    assert _run(engine, Request(LONG, greedy(4), AdapterSpec("math"))).cached_tokens > 0  # the new load's rows
    engine.close()


def test_a_gate_trained_further_in_place_does_not_share_its_old_rows(demo):
    """A GateSpec's router changed in place between requests (train_gate run again on it):
    rows routed by its old weights are not reused, and the tokens are those of an engine
    without the cache."""
    gate = GateRouter.load(demo / "routers" / "demo-gate")
    engines = [make_engine(demo), make_engine(demo, prefix_caching=False)]
    for engine in engines:
        assert _run(engine, Request(LONG, greedy(4), GateSpec(gate))).completion_tokens == 4
    with torch.no_grad():
        gate.gate.weight.neg_()
    cached, plain = (_run(engine, Request(LONG + " Again.", greedy(6, logprobs=1), GateSpec(gate)))
                     for engine in engines)
    assert cached.cached_tokens == 0 and cached.token_ids == plain.token_ids
    assert [lp.logprob for lp in cached.logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs], abs=1e-4)
    assert _run(engines[0], Request(LONG, greedy(2), GateSpec(gate))).cached_tokens > 0  # the new weights' rows
    for engine in engines:
        engine.close()


def test_prompt_logprobs_requests_compute_every_token(demo):
    engine = make_engine(demo)
    plain = make_engine(demo, prefix_caching=False)
    _run(engine, Request(LONG, greedy(4)))
    scored = lambda: Request(LONG, greedy(3, prompt_logprobs=2))  # noqa: E731
    out = _run(engine, scored())
    assert out.cached_tokens == 0
    assert out.prompt_logprobs == _run(plain, scored()).prompt_logprobs
    engine.close()
    plain.close()


def test_a_source_that_leaves_early_gives_what_it_computed(demo):
    """A follower waiting for a running request's prompt rows gets the rows it had computed when
    it was aborted, and computes the rest itself."""
    engine = make_engine(demo, prefill_chunk=5)
    plain = make_engine(demo, prefix_caching=False)
    source = engine.submit(Request(LONG, greedy(8), AdapterSpec("chat")))
    while engine.counters.steps < 1:  # (the adapter loads in the background first)
        engine.step()  # the source computes its first 5 prompt tokens
    follower = engine.submit(Request(LONG, greedy(8), AdapterSpec("chat")))
    engine.step()  # the follower is admitted and waits; the source computes 5 more
    assert engine.counters.steps == 2 and [s.num_computed for s in engine._running] == [10, 0]
    engine.abort(source.request_id)
    out = follower.result()
    assert out.cached_tokens == 10
    assert out.token_ids == _run(plain, Request(LONG, greedy(8), AdapterSpec("chat"))).token_ids
    assert list(source)[-1].finish_reason == "abort"
    engine.close()
    plain.close()


def test_cached_slots_go_least_recent_first_and_rows_past_a_shared_prefix_are_zeroed(demo):
    engine = make_engine(demo, max_batch=2)
    tokenizer = engine.tokenizer
    a, b, c = LONG, PROMPTS[0] + " and 5 + 5? And 6 + 6?", PROMPTS[1]
    for prompt in (a, b, c):  # c needs a slot: a's, the older, is zeroed and taken
        _run(engine, Request(prompt, greedy(6)))
    hit = _run(engine, Request(b, greedy(2)))  # b's slot, taken as it is and cached again
    assert hit.cached_tokens == len(tokenizer(b)["input_ids"]) - 1
    assert _run(engine, Request(a, greedy(2))).cached_tokens == 0  # (taking c's slot, now the older)
    # A prompt sharing 3 tokens with the cached `a` takes its slot; the rows past what it
    # computes are zeroed, not left over from `a`.
    ids = tokenizer(a)["input_ids"][:3] + tokenizer(" zebra")["input_ids"]
    out = _run(engine, Request(ids, greedy(2)))
    assert out.cached_tokens == 3
    k, v = engine.kv_cache.k, engine.kv_cache.v
    rows = [(slot, len(tokens)) for slot, (_, tokens) in engine.kv_slots._cached.items()]
    assert len(rows) == 2
    for slot, length in rows:
        assert k[:, slot, :, :length].abs().sum(-1).all() and not k[:, slot, :, length:].any()
        assert not v[:, slot, :, length:].any()
    engine.close()


def test_a_partial_match_copies_and_keeps_the_cached_prompt_for_others(demo):
    """A prompt that shares only the start of a cached one (a common system prompt) copies those
    rows into a free slot: the cached prompt stays whole for a later request that shares it all."""
    engine = make_engine(demo)
    plain = make_engine(demo, prefix_caching=False)
    first, other = LONG + " Question one?", LONG + " Another thing entirely."
    n_first = len(engine.tokenizer(first)["input_ids"])
    outs = []
    for prompt in (first, other, first):
        outs.append(_run(engine, Request(prompt, greedy(4))))
        assert outs[-1].token_ids == _run(plain, Request(prompt, greedy(4))).token_ids
    assert [o.cached_tokens for o in outs][::2] == [0, n_first - 1]
    assert 10 < outs[1].cached_tokens < n_first - 1
    engine.close()
    plain.close()


def test_without_prefix_caching_every_slot_is_freed_and_nothing_shared(demo):
    engine = make_engine(demo, prefix_caching=False)
    outs = engine.generate([Request(LONG, greedy(4)) for _ in range(3)])
    assert [o.cached_tokens for o in outs] == [0, 0, 0] and engine.stats().prefix_hits == 0
    assert engine.kv_slots.cached() == 0 and engine.kv_slots.available() == 4
    # Every sequence slot is zeroed; the scratch slot past them takes the padding rows of
    # fixed-shape decode steps (CUDA graphs), which no sequence reads.
    slots = slice(0, engine.config.max_batch)
    assert not engine.kv_cache.k[:, slots].any() and not engine.kv_cache.v[:, slots].any()
    engine.close()


def test_a_busy_background_engine_with_shared_prefixes_and_aborts(demo):
    """Requests with one system prompt on three routings, four slots, some aborted while they
    wait or run, on the engine's own step thread: every other request ends with the tokens of
    an engine without the cache, and every slot ends free or cached with its rows past the
    cached tokens zeroed."""
    import threading

    engine = make_engine(demo, background=True, prefill_chunk=5, max_queue=32)
    plain = make_engine(demo, prefix_caching=False, max_queue=32)
    routings = [AdapterSpec("math"), BaseSpec(), RouterSpec("demo-gate")]
    prompts = [LONG + f" Question {i}?" for i in range(4)]
    requests = lambda: [Request(prompts[i % 4], greedy(5), routings[i % 3]) for i in range(18)]  # noqa: E731
    want = [o.token_ids for o in plain.generate(requests())]
    try:
        handles = [engine.submit(r) for r in requests()]
        aborted = {3, 7, 8, 16}
        threading.Timer(0.05, lambda: [engine.abort(handles[i].request_id) for i in aborted]).start()
        outs = [h.result() for h in handles]
        for i, (out, tokens) in enumerate(zip(outs, want)):
            if out.finish_reason != "abort":
                assert out.token_ids == tokens, i
        assert sum(o.cached_tokens > 0 for o in outs) >= 6
        assert engine.kv_slots.available() == 4 and not engine._running
        for slot, (_, tokens) in engine.kv_slots._cached.items():
            assert not engine.kv_cache.k[:, slot, :, len(tokens):].any()
    finally:
        engine.close()
        plain.close()
