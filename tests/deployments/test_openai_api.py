"""The OpenAI-compatible API on a real Serve app with the real engine and the demo model."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from deployments.bootstrap import DEMO_MODEL_NAME
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec

PROMPT = "Q: What is 2 + 3? A:"


@pytest.fixture(scope="module")
def oai(served):
    return OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline_math(served):
    """An offline engine on the demo model whose adapter keys all load the demo `math` adapter:
    what the served app's outputs are held against."""
    engine = Engine(served.demo / "model", EngineConfig(max_seq_len=256, hot_slots=2, max_rank=16),
                    adapter_loader=lambda key: load_peft_adapter(served.demo / "adapters" / "math", name=key))
    yield engine
    engine.close()


def test_healthz_and_models(served):
    with served.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert ids[DEMO_MODEL_NAME]["kind"] == "base"
    assert {"code", "math", "chat", "multilingual"} <= set(ids)
    assert ids["molora:demo-gate"]["adapters"] == ["code", "math", "chat", "multilingual"]


def test_openai_client_retrieves_each_model(served, oai):
    """GET /v1/models/{id}: what the list says of each model, a pinned version too; 404 otherwise."""
    with served.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    for model_id in (DEMO_MODEL_NAME, "math", "molora:demo-gate"):
        got = oai.models.retrieve(model_id)
        assert got.id == model_id and got.model_dump(exclude_none=True) == listed[model_id]
    pinned = oai.models.retrieve("math@1")
    assert (pinned.id, pinned.version, pinned.kind) == ("math@1", 1, "adapter")
    for missing in ("no-such-model", "math@999", "molora:no-such-router"):
        with pytest.raises(openai.NotFoundError) as err:
            oai.models.retrieve(missing)
        assert err.value.body["code"] == "model_not_found" and missing in err.value.body["message"]


def test_openai_client_completions(oai):
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 0
    chunks = list(oai.completions.create(model="math", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == out.choices[0].text  # greedy: streamed and whole outputs agree
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_client_chat(oai):
    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "def add(a, b):"}]
    out = oai.chat.completions.create(model="molora:demo-gate", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model="molora:demo-gate", messages=messages, max_tokens=8,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(oai):
    a = oai.completions.create(model="chat", prompt="Hello", max_tokens=12, temperature=0.9, seed=7)
    b = oai.completions.create(model="chat", prompt="Hello", max_tokens=12, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_register_over_http_then_greedy_equals_offline(served, oai, offline_math):
    src = served.demo / "adapters" / "math"
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(src.iterdir())]
    with served.client() as c:
        r = c.post("/v1/adapters", data={"name": "math-http", "description": "uploaded"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "math-http" and r.json()["version"] == 1

    served_text = oai.completions.create(model="math-http", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    (offline,) = offline_math.generate([Request(PROMPT, SamplingParams(max_tokens=16), AdapterSpec("math"))])
    assert served_text == offline.text


def test_logit_bias_and_penalties_reach_the_engine(oai, offline_math):
    """Served with logit_bias and the three penalties, the greedy text equals the offline engine's
    with the same SamplingParams, and differs from the plain greedy text."""
    plain = offline_math.generate([Request(PROMPT, SamplingParams(max_tokens=16), AdapterSpec("math"))])[0]
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[2]: 4.0}
    sampling = SamplingParams(max_tokens=16, presence_penalty=0.5, frequency_penalty=1.5, logit_bias=bias,
                              repetition_penalty=1.4)
    (offline,) = offline_math.generate([Request(PROMPT, sampling, AdapterSpec("math"))])
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=0.5,
                                 frequency_penalty=1.5, logit_bias={str(t): b for t, b in bias.items()},
                                 extra_body={"repetition_penalty": 1.4})
    assert out.choices[0].text == offline.text != plain.text
    # stop_token_ids (an extension): the output ends at the first of them.
    stop = plain.token_ids[3]
    first = plain.token_ids.index(stop)
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=16, temperature=0,
                                 extra_body={"stop_token_ids": [stop]})
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", first + 1)
    # min_tokens (an extension) holds that stop token and EOS back for its first tokens.
    held = SamplingParams(max_tokens=16, min_tokens=first + 3, stop_token_ids=(stop,))
    (offline,) = offline_math.generate([Request(PROMPT, held, AdapterSpec("math"))])
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=16, temperature=0,
                                 extra_body={"stop_token_ids": [stop], "min_tokens": first + 3})
    assert out.choices[0].text == offline.text and out.usage.completion_tokens == len(offline.token_ids) >= first + 3
    # include_stop_str_in_output (an extension): the text ends after the stop string.
    stop_text = plain.text[2:5]
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop_text],
                                 extra_body={"include_stop_str_in_output": True})
    assert len(stop_text) == 3 and out.choices[0].text == plain.text[: plain.text.index(stop_text) + 3]
    # With max_tokens unset, min_tokens past the default (16) raises it to min_tokens.
    out = oai.completions.create(model="math", prompt=PROMPT, temperature=0, extra_body={"min_tokens": 20})
    assert out.usage.completion_tokens >= 20


def test_logprobs_over_the_api_equal_the_engines(oai, offline_math):
    """Completions (`logprobs`: n) and chat (`logprobs`, `top_logprobs`) carry each generated
    token's log-probability and alternatives as OpenAI shapes them, equal to the offline engine's,
    whole and streamed alike."""
    sampling = SamplingParams(max_tokens=10, logprobs=3)
    (offline,) = offline_math.generate([Request(PROMPT, sampling, AdapterSpec("math"))])
    decode = offline_math.tokenizer.decode
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [decode([t]) for t in offline.token_ids] and "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs == pytest.approx([t.logprob for t in offline.logprobs], abs=1e-5)
    for top, want in zip(lp.top_logprobs, offline.logprobs):
        alternatives = {decode([t]): v for t, v in want.top}
        assert top == pytest.approx({**alternatives, decode([want.token_id]): want.logprob}, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(oai.completions.create(model="math", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                                         stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat = oai.chat.completions.create(model="math", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= -9999.0 for e in content)
    chunks = list(oai.chat.completions.create(model="math", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # (The streamed call may start from the first's cached prompt, its last token run in a step
    # of another shape: equal to float32 rounding, not bit for bit.)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    assert oai.completions.create(model="math", prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


def test_echo_returns_the_prompt_scored_as_the_engine_scores_it(oai, offline_math):
    """echo with max_tokens=0 and logprobs scores the prompt (lm-eval-harness's loglikelihood
    call): the prompt's text, its tokens, None for the first token and the offline engine's
    log-probabilities for the rest; echo with generation puts the prompt before the completion,
    whole and streamed alike."""
    ids = list(offline_math.tokenizer(PROMPT)["input_ids"])
    sampling = SamplingParams(max_tokens=0, prompt_logprobs=2)
    (offline,) = offline_math.generate([Request(PROMPT, sampling, AdapterSpec("math"))])
    decode = offline_math.tokenizer.decode
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([t.logprob for t in offline.prompt_logprobs[1:]], abs=1e-5)
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])
    plain = oai.completions.create(model="math", prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = oai.completions.create(model="math", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=1)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.choices[0].logprobs.tokens[: len(ids)] == lp.tokens
    assert len(echoed.choices[0].logprobs.tokens) == len(ids) + echoed.usage.completion_tokens
    chunks = list(oai.completions.create(model="math", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                         logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == \
        echoed.choices[0].logprobs.tokens
    alone = oai.completions.create(model="math", prompt=PROMPT, max_tokens=0, echo=True)  # OpenAI's: the prompt
    assert (alone.choices[0].text, alone.choices[0].logprobs, alone.usage.completion_tokens) == (PROMPT, None, 0)


def test_logprobs_text_offsets_count_into_the_text_past_a_special_token(oai, offline_math):
    """A generated special token (EOS past ignore_eos) keeps its name among the logprobs tokens
    but is left out of the text, so it moves no text_offset: every offset points into the text."""
    tokenizer = offline_math.tokenizer
    eos = tokenizer.eos_token_id
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                 logit_bias={str(eos): 100}, extra_body={"ignore_eos": True})
    lp, text = out.choices[0].logprobs, out.choices[0].text
    assert lp.tokens == [tokenizer.eos_token] * 6 and text == "" and lp.text_offset == [0] * 6
    plain = oai.completions.create(model="math", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1,
                                   extra_body={"ignore_eos": True})
    assert "".join(plain.choices[0].logprobs.tokens) == plain.choices[0].text


def test_n_choices_whole_and_streamed(served, oai):
    """n choices come back with indices 0..n-1; choice i is the single request seeded seed + i
    (so seeded choices differ and repeat); usage counts the prompt once and every choice's tokens;
    a stream interleaves the choices' chunks by index."""
    kw = dict(model="chat", prompt="Hello", max_tokens=10, temperature=1.0, seed=11)
    out = oai.completions.create(n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [oai.completions.create(**{**kw, "seed": 11 + i}) for i in range(3)]
    assert [c.text for c in out.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat = oai.chat.completions.create(model="molora:demo-gate", messages=messages, max_tokens=8, temperature=0.8,
                                       seed=3, n=2)
    chunks = list(oai.chat.completions.create(model="molora:demo-gate", messages=messages, max_tokens=8,
                                              temperature=0.8, seed=3, n=2, stream=True,
                                              stream_options={"include_usage": True, "continuous_usage_stats": True}))
    texts, counted = {0: "", 1: ""}, {0: [], 1: []}
    for c in chunks[:-1]:  # continuous usage stats: every chunk, the role chunks too, counts the prompt
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        assert c.usage.prompt_tokens == chat.usage.prompt_tokens
        counted[choice.index].append((choice.delta.role, c.usage.completion_tokens))
    assert [texts[0], texts[1]] == [c.message.content for c in chat.choices]
    for seen in counted.values():
        assert seen[0] == ("assistant", 0) and all(role is None for role, _ in seen[1:])
        assert [n for _, n in seen] == sorted(n for _, n in seen)
    assert sum(seen[-1][1] for seen in counted.values()) == chat.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 2
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_a_repeated_prompt_is_served_from_the_prefix_cache(oai, offline_math):
    """The same prompt again goes to the replica that ran it (the request router's prefix
    affinity puts it first; with idle replicas Serve's tie-break alone picks one replica too,
    so test_request_router.py checks the affinity itself) and is served from its prefix cache:
    usage's cached_tokens counts all of the prompt but its last token, and the greedy text is
    still the offline engine's."""
    prompt = "Zebra notes, page 7: the quick brown fox jumps over the lazy dog, twice. Then:"
    kw = dict(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    replicas, outs = set(), []
    for _ in range(3):
        raw = oai.completions.with_raw_response.create(**kw)
        replicas.add(raw.headers["x-molora-replica"])
        outs.append(raw.parse())
    assert len(replicas) == 1
    assert [o.usage.prompt_tokens_details.cached_tokens for o in outs] == [0] + [outs[0].usage.prompt_tokens - 1] * 2
    want = offline_math.submit(Request(prompt, SamplingParams(max_tokens=6))).result().text
    assert {o.choices[0].text for o in outs} == {want}


def test_a_batch_of_prompts_gets_n_choices_each_in_openais_order(oai, offline_math):
    """prompt as a batch (texts, or token-id lists as lm-evaluation-harness sends them): choice j
    of prompt p at index p * n + j, each the offline engine's output for its prompt; usage counts
    every prompt once; a stream carries the same choices by index; a batch of echo scoring calls
    (max_tokens 0) scores each prompt."""
    prompts = [PROMPT, "def add(a, b):", "Bonjour"]
    offline = offline_math.generate([Request(p, SamplingParams(max_tokens=6), AdapterSpec("math")) for p in prompts])
    out = oai.completions.create(model="math", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [o.text for o in offline for _ in range(2)]
    assert out.usage.prompt_tokens == sum(o.prompt_tokens for o in offline)
    assert out.usage.completion_tokens == 2 * sum(len(o.token_ids) for o in offline)
    chunks = list(oai.completions.create(model="math", prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True,
                                         stream_options={"include_usage": True, "continuous_usage_stats": True}))
    texts, seen = [""] * 6, [(0, 0)] * 6
    for c in chunks[:-1]:  # with continuous_usage_stats each chunk carries its choice's usage so far
        (choice,) = c.choices
        texts[choice.index] += choice.text
        seen[choice.index] = (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert texts == [c.text for c in out.choices]
    usage = chunks[-1].usage  # (its cached_tokens may differ: the first call's prompts are cached now)
    assert (usage.prompt_tokens, usage.completion_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert seen == [(o.prompt_tokens, len(o.token_ids)) for o in offline for _ in range(2)]
    ids = [offline_math.tokenizer(p)["input_ids"] for p in prompts]
    scored = oai.completions.create(model="math", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    for choice, prompt_ids, prompt in zip(scored.choices, ids, prompts):
        assert choice.text == prompt and len(choice.logprobs.token_logprobs) == len(prompt_ids)
        assert choice.logprobs.token_logprobs[0] is None and None not in choice.logprobs.token_logprobs[1:]
    with pytest.raises(openai.BadRequestError) as err:  # the prompt at fault is named
        oai.completions.create(model="math", prompt=[[5, 6], [7, 10**6]], max_tokens=1)
    assert err.value.body["message"].startswith("prompt[1]: prompt token ids [1000000]")
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="math", prompt=[[5, 6], ["a"]], max_tokens=1)
    assert "a list of strings or a list of token-id lists" in err.value.body["message"]


def test_a_client_that_leaves_a_stream_of_n_choices_aborts_them(served):
    """Closing a streamed request of 2 choices early aborts both in the engines (the replicas'
    published `aborted` counters grow by 2) instead of letting them run to max_tokens."""
    import time

    from deployments.replica import stats_key

    client = served.registry.client

    def aborted() -> int:
        keys = list(client.scan_iter(match=stats_key("molora", "*")))
        return sum(json.loads(raw)["aborted"] for raw in client.mget(keys) if raw)

    time.sleep(1.0)
    before = aborted()
    body = {"model": "code", "prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 2}
    with served.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break
    deadline = time.monotonic() + 20
    while aborted() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert aborted() == before + 2


def test_concurrent_mixed_requests(served):
    bodies = []
    for i in range(16):
        kind = i % 4
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 6, "temperature": 0}
        if kind == 0:
            body["model"] = DEMO_MODEL_NAME
        elif kind == 1:
            body["model"] = ["code", "math", "chat", "multilingual"][i % 3]
        elif kind == 2:
            body.update(model=DEMO_MODEL_NAME, adapters=[{"name": "code", "weight": 0.6}, {"name": "math", "weight": 0.4}])
        else:
            body["model"] = "molora:demo-gate"
        bodies.append(body)

    def call(body):
        with served.client() as c:
            return c.post("/v1/completions", json=body)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, bodies))
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text for r in results if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in results)
    # The same greedy request alone gives the same text as inside the concurrent batch.
    alone = call(bodies[2]).json()["choices"][0]["text"]
    assert alone == results[2].json()["choices"][0]["text"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "no-such-model", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "molora:no-such-router", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "math", "prompt": "x", "temperature": -1}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "top_p": 0}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "max_tokens": 0}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "n": 17}, 400, "invalid_request"),
        ({"model": "math", "prompt": ["x"] * 65}, 400, "invalid_request"),
        ({"model": "math", "prompt": ["x"] * 5, "n": 13}, 400, "invalid_request"),
        ({"model": "math", "prompt": ["x", ""]}, 400, "invalid_request"),
        ({"model": "math", "prompt": [[1, 2], []]}, 400, "invalid_request"),
        ({"model": "math", "prompt": [[1, 2], ["a"]]}, 400, "invalid_request"),
        ({"model": "math"}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x " * 400}, 400, "context_length_exceeded"),
        ({"model": "math", "prompt": "x", "adapters": [{"name": "code", "weight": 1}]}, 400, "invalid_request"),
        ({"model": DEMO_MODEL_NAME, "prompt": "x", "adapters": [{"name": "nope", "weight": 1}]}, 404, "model_not_found"),
        ({"model": DEMO_MODEL_NAME, "prompt": "x", "adapters": [{"name": "code", "weight": -1}]}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "presence_penalty": 2.5}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "repetition_penalty": 0}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "logit_bias": {"5": 101}}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "logit_bias": {"five": 1}}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "logit_bias": {"\u00b2": 1}}, 400, "invalid_request"),  # "²".isdigit()
        ({"model": "math", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "best_of": 3}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "logprobs": 21}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "max_tokens": 0, "logprobs": 1}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "suffix": "return a"}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "max_tokens": 3, "min_tokens": 4}, 400, "invalid_request"),
        ({"model": "math", "prompt": "x", "min_tokens": -1}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, code):
    with served.client() as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "type" in err and "param" in err


def test_tokenize_and_detokenize_count_what_generation_prefills(served, oai, offline_math):
    """/tokenize gives the ids a completion (or a chat completion) prefills: as many as its
    usage's prompt_tokens, the offline tokenizer's for a prompt; /detokenize turns them back."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    completion = oai.completions.create(model="math", prompt=PROMPT, max_tokens=1)
    chat = oai.chat.completions.create(model="math", messages=messages, max_tokens=1)
    with served.client() as c:
        prompt = c.post("/tokenize", json={"model": "math", "prompt": PROMPT}).json()
        chatted = c.post("/tokenize", json={"model": "molora:demo-gate", "messages": messages}).json()
        text = c.post("/detokenize", json={"model": DEMO_MODEL_NAME, "tokens": prompt["tokens"]}).json()
        refused = [
            (c.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model_not_found"),
            (c.post("/tokenize", json={"model": "math", "prompt": "x", "messages": messages}), 400, "invalid_request"),
            (c.post("/tokenize", json={"model": "math"}), 400, "invalid_request"),
            (c.post("/detokenize", json={"model": "math", "tokens": [5, 10**7]}), 400, "invalid_request"),
        ]
    assert prompt["tokens"] == offline_math.tokenizer(PROMPT)["input_ids"]
    assert (prompt["count"], prompt["max_model_len"]) == (completion.usage.prompt_tokens, 256)
    assert chatted["count"] == len(chatted["tokens"]) == chat.usage.prompt_tokens
    assert text == {"prompt": PROMPT}
    for r, status, code in refused:
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert "10000000" in refused[-1][0].json()["error"]["message"]


def test_max_tokens_past_the_context_is_refused_unless_unset(served, oai):
    """The served app's max_seq_len is 256. A prompt of 250 tokens with max_tokens set past the
    rest of the context gets OpenAI's 400 context_length_exceeded (chat's max_completion_tokens
    too); with max_tokens unset, the default (16) ends at the context's end instead."""
    prompt = [17] * 250
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="math", prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "max_tokens"
    assert "250 in the prompt, max_tokens=7" in err.value.body["message"]
    fits = oai.completions.create(model="math", prompt=prompt, max_tokens=6, extra_body={"ignore_eos": True})
    cut = oai.completions.create(model="math", prompt=prompt, extra_body={"ignore_eos": True})
    for out in (fits, cut):
        usage = out.usage
        assert (usage.prompt_tokens, usage.completion_tokens, out.choices[0].finish_reason) == (250, 6, "length")
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": [{"role": "user", "content": "x " * 120}],
                                                 "max_completion_tokens": 200})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "max_tokens=200 for the completion" in r.json()["error"]["message"]


def test_bad_json_and_bad_chat(served):
    with served.client() as c:
        r = c.post("/v1/chat/completions", content=b'{"model": "math", "messages": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400
        message = [{"role": "user", "content": "x"}]
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": message, "max_completion_tokens": 3,
                                                 "min_tokens": 5})
        assert r.status_code == 400 and "min_tokens=5 exceeds max_tokens=3" in r.json()["error"]["message"], r.text
        tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
        refused = [("tools", [tool]), ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
                   ("modalities", ["text", "audio"])]
        for field, value in refused:
            r = c.post("/v1/chat/completions", json={"model": "math", "messages": message, field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            assert "not supported" in r.json()["error"]["message"]
        # Their defaults pass, as clients send them.
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": message, "max_tokens": 2, "tools": [],
                                                 "tool_choice": "none", "response_format": {"type": "text"}})
        assert r.status_code == 200, r.text
        r = c.post("/v1/chat/completions", json={"model": "math", "messages": message, "max_tokens": 0})
        assert r.status_code == 400 and "max_tokens=0" in r.json()["error"]["message"], r.text
        for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
            r = c.post("/v1/chat/completions", json={"model": "math", "messages": message, **extra})
            assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"], r.text
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        json_headers = {"content-type": "application/json"}
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "math", "prompt": "half an emoji: \\ud83d"}'):
            r = c.post("/v1/completions", content=body, headers=json_headers)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        r = c.post("/v1/completions", content=b'{"model": "math", "prompt": "\\ud83d\\ude00", "max_tokens": 1}',
                   headers=json_headers)
        assert r.status_code == 200, r.text  # a surrogate pair is one character
        r = c.post("/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": "x", "adapters": [{"name": "nope"}]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "adapters" and "'nope'" in r.text, r.text


def test_null_fields_take_their_defaults(served):
    """The `openai` client sends null for a parameter passed as None: each takes its default."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stream_options", "presence_penalty",
                           "frequency_penalty", "top_k", "min_tokens", "repetition_penalty", "ignore_eos",
                           "include_stop_str_in_output", "seed", "stop", "logit_bias", "adapters"])
    with served.client() as c:
        completion = c.post("/v1/completions", json={"model": "math", "prompt": PROMPT, "max_tokens": 2, "echo": None,
                                                     "logprobs": None, **nulls})
        chat = c.post("/v1/chat/completions", json={"model": "math", "messages": [{"role": "user", "content": "x"}],
                                                    "max_tokens": 2, "logprobs": None, "top_logprobs": None, **nulls})
        missing = c.post("/v1/completions", json={"model": "math", "prompt": None})
    for r in (completion, chat):
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt", missing.text


def _samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, summed over the replica label."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'replica="[^"]*",?', "", key).replace("{}", "")
            out[key] = out.get(key, 0.0) + float(value)
    return out


def test_metrics_exposes_serving_figures(served):
    """Every family is there; a request of a known prompt adds its prompt tokens and one latency
    observation at the ingress, and one finished request in the replicas' engines."""
    import time

    with served.client() as c:
        time.sleep(1.5)  # one heartbeat publishes the replicas' counters
        before = _samples(c.get("/metrics").text)
        r = c.post("/v1/completions", json={"model": "code", "prompt": "x", "max_tokens": 2}).json()
        deadline = time.monotonic() + 15
        while True:  # until a heartbeat (every 0.5 s here) has published the replica's counters
            text = c.get("/metrics").text
            finished = 'molora_engine_requests_total{outcome="finished"}'
            if _samples(text).get(finished, 0.0) > before.get(finished, 0.0) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    for name in ("molora_time_to_first_token_seconds_bucket", "molora_tokens_per_second", "molora_queue_depth",
                 "molora_hotset_hits_total", "molora_hotset_misses_total", "molora_hotset_evictions_total",
                 "molora_adapter_load_seconds_sum", "molora_adapter_tokens_total", "molora_engine_decode_steps_total",
                 "molora_engine_graph_steps_total", "molora_engine_graph_captures_total",
                 "molora_request_latency_seconds_bucket", "molora_engine_prompt_tokens_total",
                 "molora_engine_cached_prompt_tokens_total", "molora_engine_prefix_hits_total",
                 "molora_engine_cached_kv_slots"):
        assert name in text, name
    assert 'adapter="code@1"' in text
    after = _samples(text)

    def grew(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    prompt = r["usage"]["prompt_tokens"]
    assert (grew("molora_prompt_tokens_total"), grew("molora_request_latency_seconds_count")) == (prompt, 1)
    assert grew("molora_engine_prompt_tokens_total") == prompt
    assert grew("molora_engine_cached_prompt_tokens_total") == r["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert grew('molora_engine_requests_total{outcome="finished"}') == 1
    assert grew("molora_generated_tokens_total") == grew("molora_engine_generated_tokens_total") == 2
    json.dumps(text)
