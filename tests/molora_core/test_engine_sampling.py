"""The engine's sampling against transformers generate and log_softmax: seeds, logit_bias and
penalties, log-probabilities of generated and prompt tokens, min_tokens, stop strings."""

from __future__ import annotations

import functools

import pytest
import torch

from molora_core.engine import Request, SamplingParams
from molora_core.errors import RequestInvalid
from tests.molora_core.test_engine import PROMPTS, demo, greedy, hf_reference, make_engine  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def engine(demo):
    return make_engine(demo)


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


# Prompts whose greedy tokens repeat on CI's demo model, so that every case below changes them;
# the other prompts stand by for a demo model trained elsewhere.
@pytest.mark.parametrize("adapter,prompt", [(None, PROMPTS[0]), ("code", PROMPTS[3])])
def test_logit_bias_and_penalties_equal_transformers_generate(demo, engine, adapter, prompt):
    """logit_bias and repetition_penalty against transformers' own (`sequence_bias`,
    `repetition_penalty`); presence / frequency penalties against transformers greedy with
    OpenAI's formula as a logits processor. The adjusted request
    shares its batch with an unadjusted one, which must still give the plain greedy tokens."""
    from transformers import LogitsProcessorList

    reference, tokenizer, routing = hf_reference(demo, adapter)
    n = 20
    stop_at_eos = functools.partial(SamplingParams, max_tokens=n)  # as transformers' generate does

    def penalties(prompt_len, presence, frequency):
        processor = _OpenAIPenalties(prompt_len, presence, frequency)
        return (stop_at_eos(presence_penalty=presence, frequency_penalty=frequency),
                {"logits_processor": LogitsProcessorList([processor])})

    def settings(case, ids, plain):
        """The case's settings, milder first (the demo model's tokens depend on the CPU that
        trained it: a penalty needs tokens that repeat, and some need a stronger push)."""
        if case == 0:
            bias = {plain[1]: -100.0, plain[4]: -3.5, int(ids[0, -1]): 2.0}
            return [(stop_at_eos(logit_bias=bias), {"sequence_bias": [[[t], b] for t, b in bias.items()]})]
        if case in (1, 2):
            strengths = [(0.7, 1.3), (2.0, 2.0)] if case == 1 else [(-1.5, 0.0), (-2.0, -2.0)]
            return [penalties(ids.shape[1], *pf) for pf in strengths]
        return [(stop_at_eos(repetition_penalty=r), {"repetition_penalty": r})
                for r in ((1.8, 4.0) if case == 3 else (0.6, 0.2))]

    prompts = [prompt, *(p for p in PROMPTS if p != prompt)]
    plains = {}
    for case in range(5):
        # The first prompt and setting that change transformers' greedy tokens make the check.
        want = plain = hf_kwargs = None
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if text not in plains:
                plains[text] = engine.submit(Request(text, stop_at_eos(), routing)).result().token_ids
            plain = plains[text]
            if len(plain) < 5:
                continue
            for sampling, hf_kwargs in settings(case, ids, plain):
                with torch.no_grad():
                    out = reference.generate(ids, max_new_tokens=n, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id, **hf_kwargs)
                want = out[0, ids.shape[1] :].tolist()
                if want != list(plain):
                    break
            if want != list(plain):
                break
        assert want is not None and want != list(plain), \
            f"{hf_kwargs} must change the greedy tokens of a prompt for this test to tell"
        adjusted = engine.submit(Request(text, sampling, routing))
        beside = engine.submit(Request(text, stop_at_eos(), routing))
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


def test_a_prompt_that_fills_the_context_is_scored(demo, engine):
    """A request that only scores its prompt (max_tokens=0, lm-evaluation-harness's loglikelihood
    call) may fill max_seq_len: its last token's log-probability equals transformers'. One token
    more, or the same prompt with a token to generate, is refused."""
    reference, tokenizer, _ = hf_reference(demo, None)
    limit = engine.config.max_seq_len
    ids = (tokenizer(" ".join(PROMPTS))["input_ids"] * limit)[:limit]
    out = engine.submit(Request(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))).result()
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -2].float(), dim=-1)[ids[-1]].item()
    assert len(out.prompt_logprobs) == limit and out.prompt_logprobs[-1].logprob == pytest.approx(want, abs=1e-4)
    for prompt, sampling in ((ids + ids[:1], SamplingParams(max_tokens=0, prompt_logprobs=0)), (ids, greedy(1))):
        with pytest.raises(RequestInvalid, match=f"does not fit max_seq_len={limit}"):
            engine.submit(Request(prompt, sampling))
    assert not engine._waiting and not engine._running


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
    cases = [(SamplingParams(max_tokens=max(n, len(plain) + 8), min_tokens=len(plain) + 3), list(engine.eos_ids),
              len(plain)),
             (SamplingParams(max_tokens=n, min_tokens=i + 2, stop_token_ids=(plain[i],)),
              [plain[i], *engine.eos_ids], i + 1)]
    for sampling, ends, unheld in cases:
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=sampling.max_tokens, min_new_tokens=sampling.min_tokens,
                                     do_sample=False, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        want = out[0, ids.shape[1] :].tolist()
        assert len(want) >= sampling.min_tokens > unheld, "min_tokens must hold an end back for this test to tell"
        got = engine.submit(Request(prompt, sampling, routing)).result()
        assert list(got.token_ids) == want
        assert got.finish_reason == ("stop" if want[-1] in ends else "length")
    with pytest.raises(RequestInvalid, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(RequestInvalid, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def _token_texts(engine, prompt, n):
    """The greedy text of n tokens, and where each token's text ends in it: the engine's own
    text of the first k tokens, k = 1..n (decoding a prefix alone may differ)."""
    texts = [out.text for out in engine.generate([Request(prompt, greedy(k)) for k in range(1, n + 1)])]
    assert all(texts[-1].startswith(text) for text in texts)
    return texts[-1], [len(text) for text in texts]


def _min_tokens_stop_strings(plain, ends):
    """(old, span, sixth, new) stop strings of the test below, cut at the text's token boundaries,
    or None where the text does not offer them."""
    words = [plain[a:b].strip() for a, b in zip([0, *ends], ends)]  # each token's text

    def first_in(word, lo, hi):  # a word whose first occurrence lies in plain[lo:hi]
        at = plain.find(word) if len(word) >= 2 else -1
        return at >= lo and at + len(word) <= hi

    head, sixth = ends[4], ends[5]  # the first five tokens' text, and where the sixth's ends
    old = next((w for w in words[1:5] if first_in(w, 0, head) and plain.count(w) == 1), None)
    new = next((w for w in words[7:] if first_in(w, sixth, len(plain))), None)
    span = plain[head - 2 : head + 2]  # begins in the fifth token, ends in the sixth
    if old and new and sixth - head >= 2 and plain.find(span) == head - 2 and first_in(words[5], head, sixth):
        return old, span, words[5], new
    return None


def test_min_tokens_looks_for_stop_strings_from_its_last_token_on(engine):
    """Until min_tokens tokens are out no stop string ends the output; from the min_tokens-th
    token on, a stop string counts where it ends in new text, even if it began earlier (vLLM's
    rule), each string in its own window. The stop strings are cut from the greedy text at its
    token boundaries (on CI's machines ' I', ' am', ' doing', ' well', ',', ' thank', ...; the
    demo model's text depends on the CPU that trained it), of the first prompt that offers them."""
    for prompt in (PROMPTS[2], *PROMPTS[:2], PROMPTS[3]):
        plain, ends = _token_texts(engine, prompt, 16)
        strings = _min_tokens_stop_strings(plain, ends)
        if strings:
            break
    assert strings, f"no prompt's text offers these stop strings for this test to tell (the last: {plain!r})"
    old, span, sixth, new = strings
    head = ends[4]
    cases = [  # stop strings, the text without min_tokens, and with min_tokens=6
        ((old,), plain[: plain.index(old)], plain, "length"),  # in the first five tokens' text only
        ((span,), plain[: head - 2], plain[: head - 2], "stop"),  # begins there, ends in the sixth token
        ((sixth,), plain[: plain.index(sixth)], plain[: plain.index(sixth)], "stop"),  # the sixth token itself
        ((old, new, "xyzzyq"), plain[: plain.index(old)], plain[: plain.index(new)], "stop"),  # old, then new
    ]
    for stop, unheld, text, reason in cases:
        assert engine.submit(Request(prompt, greedy(16, stop=stop))).result().text == unheld
        handle = engine.submit(Request(prompt, greedy(16, stop=stop, min_tokens=6)))
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
    text, ends = _token_texts(engine, PROMPTS[2], 30)
    assert text == plain.text
    # A token of four characters or more whose first two first appear there (on CI's machines
    # " doing": " d" and " doi" arrive together).
    start = next((a for a, b in zip(ends, ends[1:]) if b - a >= 4 and text.find(text[a : a + 2]) == a), None)
    assert start is not None, f"the text {text!r} must hold such a token for this test to tell"
    pair = (text[start : start + 4], text[start : start + 2])
    for stop, end in (((text[5:8], "never-appears"), text.index(text[5:8]) + 3), (pair, start + 2)):
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


def test_tiny_temperature_and_repetition_penalty_sample_without_failing_the_batch(engine):
    """A temperature near 0 (1e-300 is 0 in float32) or a repetition penalty near 0 overflows
    logits / value to inf: such a request gets the greedy tokens or a valid draw, and the request
    beside it in the batch is not failed."""
    want = engine.submit(Request(PROMPTS[0], greedy(10))).result().token_ids
    mate_want = engine.submit(Request(PROMPTS[1], greedy(10))).result().token_ids
    mate = engine.submit(Request(PROMPTS[1], greedy(10)))
    tiny = [engine.submit(Request(PROMPTS[0], greedy(10, temperature=t, seed=3))) for t in (1e-38, 1e-300)]
    penalised = engine.submit(Request(PROMPTS[0], greedy(10, temperature=1.0, repetition_penalty=1e-40, seed=3)))
    assert [h.result().token_ids for h in tiny] == [want, want]
    out = penalised.result()
    assert out.completion_tokens == 10 and all(0 <= t < engine.vocab_size for t in out.token_ids)
    assert mate.result().token_ids == mate_want
