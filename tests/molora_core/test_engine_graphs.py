"""Fixed-shape decode steps (molora_core.engine.graphs): padded rows, buffers at fixed addresses,
and on CUDA the captured graphs, against the ordinary step.

On CPU the fixed-shape path runs uncaptured (decode_graphs="eager"), which checks everything but
the capture itself; the `gpu` tests capture and replay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import kernels.meta
from kernels import DispatchMeta
from molora_core.engine import Request, RouterSpec
from molora_core.engine.graphs import DecodeGraphs, batch_buckets, graph_mode, length_buckets
from molora_core.model import KVCache, StepBatch, load_model
from molora_core.model.attention import AttentionMeta
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, MixtureSpec, VocabSpec
from tests.molora_core.test_decoder import FP32_ATOL, ids_for, make_checkpoint
from tests.molora_core.test_engine import PROMPTS, demo, greedy, make_engine  # noqa: F401  (fixture)


def test_graph_mode():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_mode("auto", cuda, "triton", "default") == "graphs"
    assert graph_mode("auto", cpu, "torch", "default") is None
    assert graph_mode("auto", cuda, "torch", "default") is None  # the torch twin syncs with the host
    assert graph_mode("auto", cuda, "triton", "dynamic") is None  # frequencies depend on the step
    assert graph_mode("off", cuda, "triton", "default") is None
    assert graph_mode("eager", cpu, "torch", "default") == "eager"


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert length_buckets(96) == [64, 96]
    assert length_buckets(512) == [64, 128, 256, 512]


@pytest.mark.parametrize("max_seqs", [5, 16], ids=["cache-span", "rows-gathered"])
def test_static_decode_forward_matches_the_ordinary_step(tmp_path, max_seqs):
    """Rows padded to a bucket, a scratch slot, keys read up to a length bucket: the real rows'
    logits equal an ordinary decode step's, whether attention reads the whole cache span (5
    slots for 4 rows) or copies the rows' own slots out of a cache over 3x larger (16 slots)."""
    _, path = make_checkpoint(tmp_path, "qwen3")
    model = load_model(path, dtype=torch.float32)
    cache = KVCache.for_model(model, max_seqs=max_seqs, max_seq_len=32)  # the last slot is the scratch slot
    scratch = max_seqs - 1
    seqs = {3: ids_for(1, 9, seed=1)[0], 0: ids_for(1, 6, seed=2)[0], 1: ids_for(1, 12, seed=3)[0]}
    with torch.no_grad():
        for slot, ids in seqs.items():
            n = len(ids) - 1
            batch = StepBatch.build([slot], [n], [n])
            model(ids[:n], batch.positions(), batch, cache)
        snapshot = (cache.k.clone(), cache.v.clone())
        slots, lens = list(seqs), [len(ids) for ids in seqs.values()]
        last = torch.stack([ids[-1] for ids in seqs.values()])
        batch = StepBatch.build(slots, [1] * 3, lens)
        want = model(last, batch.positions(), batch, cache)
        cache.k.copy_(snapshot[0])
        cache.v.copy_(snapshot[1])

        kv_slots = torch.tensor(slots + [scratch], dtype=torch.int64)  # one padding row
        kv_lens = torch.ones(max_seqs, dtype=torch.int64)
        kv_lens[slots] = torch.tensor(lens)
        meta = AttentionMeta.static_decode(kv_slots, kv_lens, 16)
        assert meta.decode_gather == (max_seqs > 12)
        ids = torch.cat([last, torch.zeros(1, dtype=torch.int64)])
        positions = torch.tensor([n - 1 for n in lens] + [0])
        got = model.forward_static_decode(ids, positions, meta, cache)
    assert got.shape == (4, model.config.vocab_size)
    assert (got[:3] - want).abs().max().item() <= FP32_ATOL


def _mixed_requests(tokenizer_vocab, copies=1):
    specs = [BaseSpec(), AdapterSpec("code"), MixtureSpec(("math", "chat"), (0.7, 0.3)),
             VocabSpec(((0, 300, "code"), (300, tokenizer_vocab, "multilingual"))), RouterSpec("demo-gate")]
    # The gate request (last) stops first: later decode steps run the plan's routes only.
    return [Request(PROMPTS[i % len(PROMPTS)], greedy(12 - 2 * i), spec)
            for _ in range(copies) for i, spec in enumerate(specs)]


@pytest.mark.parametrize("max_batch,copies", [(5, 1), (24, 5)])
def test_fixed_shape_engine_generates_what_the_ordinary_engine_does(demo, max_batch, copies):
    """Mixed routing (the gate routed inside the step), padding rows, and (24-row case) decode
    steps past 16 sequences."""
    sizes = dict(max_batch=max_batch, max_queue=32, prefill_chunk=5 if max_batch == 5 else 64)
    eager = make_engine(demo, decode_graphs="off", **sizes)
    fixed = make_engine(demo, decode_graphs="eager", **sizes)
    assert eager.graphs is None and isinstance(fixed.graphs, DecodeGraphs)
    assert fixed.kv_cache.max_seqs == max_batch + 1  # one scratch slot
    calls = []
    run = fixed.graphs.run
    fixed.graphs.run = lambda *a: calls.append((len(a[0]), a[4] is not None)) or run(*a)
    vocab = len(fixed.tokenizer)
    want = [o.token_ids for o in eager.generate(_mixed_requests(vocab, copies))]
    got = [o.token_ids for o in fixed.generate(_mixed_requests(vocab, copies))]
    assert got == want
    # Every decode step takes the fixed shape: those with the gate request route it inside the
    # step, the later ones run the plan's routes; some steps have padding rows.
    assert any(gated for _, gated in calls) and not all(gated for _, gated in calls), calls
    assert any(fixed.graphs.rows_for(n) > n for n, _ in calls), calls
    assert any(key[2] == "gate" for key in fixed.graphs._shapes)
    if max_batch == 24:
        assert max(n for n, _ in calls) > 16, calls  # the 24-row bucket ran
    stats = fixed.stats()
    assert stats.graph_steps == len(calls) and stats.graph_captures == 0  # uncaptured mode
    assert stats.decode_steps >= len(calls) and eager.stats().graph_steps == 0
    eager.close()
    fixed.close()


def test_gate_rows_and_slots_that_change_between_steps_reach_the_fixed_shape_step(demo):
    """A step copies the gate's flagged rows and adapter slots to the device only when they
    change: rows move when a request before them ends, and slots when the gate's adapters come
    back into other slots. Both engines see the same requests; the fixed-shape one must route
    as the ordinary one does throughout."""
    engines = [make_engine(demo, decode_graphs=mode, max_queue=32, prefill_chunk=64) for mode in ("off", "eager")]
    eager, fixed = engines
    seen, logprobs = [], []
    run = fixed.graphs.run
    fixed.graphs.run = lambda *a: seen.append(a[4] and (tuple(a[4].rows), tuple(a[4].lookup))) or run(*a)

    def interleaved():
        on_gate = RouterSpec("demo-gate")
        return [Request(PROMPTS[0], greedy(3)), Request(PROMPTS[1], greedy(10), on_gate),
                Request(PROMPTS[2], greedy(12)), Request(PROMPTS[3], greedy(10), on_gate)]

    def gate():
        return [Request(PROMPTS[2], greedy(8, logprobs=1), RouterSpec("demo-gate"))]

    for engine in engines:
        outs = [engine.generate(gate())[0].token_ids]  # (the router loads: then every request starts at once)
        outs += [o.token_ids for o in engine.generate(interleaved())]
        # The gate's adapters leave and come back in the reverse order: other slots.
        for name in ("code", "math", "chat", "multilingual"):
            engine.hotset.remove(name)
        for name in ("multilingual", "chat", "math", "code"):
            engine.generate([Request(PROMPTS[0], greedy(1), AdapterSpec(name))])
        last = engine.generate(gate())[0]  # (its log-probabilities tell adapters apart where tokens may not)
        outs.append(last.token_ids)
        logprobs.append([lp.logprob for lp in last.logprobs])
        if engine is eager:
            want = outs
    assert outs == want and logprobs[1] == pytest.approx(logprobs[0], abs=1e-4)
    gated = [step for step in seen if step is not None]
    pairs = [rows for rows, _ in gated if len(rows) == 2]
    assert len(set(pairs)) >= 2, gated  # the two gate requests' rows moved once the first request ended
    assert len({slots for _, slots in gated}) == 2, gated  # and the slots, for the last request
    eager.close()
    fixed.close()


def _second_gate(demo, tmp_path) -> Path:
    """The demo's routers plus `other-gate`, a top-1 gate over three adapters in another order."""
    routers = tmp_path / "routers"
    shutil.copytree(demo / "routers", routers)
    torch.manual_seed(11)
    other = GateRouter(GateRouter.load(demo / "routers" / "demo-gate").hidden_size, ["math", "multilingual", "code"], top_k=1)
    other.gate.weight.data.normal_(std=1.0)  # spread its choices over the three adapters
    other.save(routers / "other-gate")
    return routers


def test_steps_on_two_gates_run_eagerly_and_old_gates_shapes_are_dropped(demo, tmp_path):
    """Rows on two different gates in one step leave the fixed shape (one gate per step routes
    inside it); a third gate's shapes replace the least recently used one's (max_routers)."""
    routers = _second_gate(demo, tmp_path)
    sizes = dict(max_batch=4, max_queue=32, prefill_chunk=64, max_routers=1)
    engines = [make_engine(demo, decode_graphs=mode, **sizes) for mode in ("off", "eager")]
    for engine in engines:
        engine.admission.router_loader = lambda name: GateRouter.load(routers / name)
    eager, fixed = engines
    calls, gates_per_decode_step = [], []
    run, logits = fixed.graphs.run, fixed.runner.logits
    fixed.graphs.run = lambda *a: calls.append(a[4] is not None) or run(*a)

    def counting_logits(entries, flat, is_decode, keep_hidden=()):
        if is_decode:
            routers = [seq.router for seq, _ in entries if seq.router is not None and seq.router.needs_hidden]
            gates_per_decode_step.append(len({r.batch_key() for r in routers}))
        return logits(entries, flat, is_decode, keep_hidden)

    fixed.runner.logits = counting_logits
    both = lambda: [Request(PROMPTS[0], greedy(6), RouterSpec("demo-gate")),  # noqa: E731
                    Request(PROMPTS[1], greedy(9), RouterSpec("other-gate"))]
    assert [o.token_ids for o in fixed.generate(both())] == [o.token_ids for o in eager.generate(both())]
    # While both run, decode steps are eager; a decode step on one gate takes the fixed shape,
    # routed inside it. (The routers load in the background, so how many steps the two requests
    # share depends on when each load ends: usually demo-gate's decode tokens 2-6, leaving
    # other-gate's last 3 decode steps alone.)
    assert 2 in gates_per_decode_step, gates_per_decode_step
    assert calls == [True] * gates_per_decode_step.count(1), (calls, gates_per_decode_step)
    gates = {shape.gate for shape in fixed.graphs._shapes.values() if shape.gate is not None}
    assert [g.adapters for g in gates] == [["math", "multilingual", "code"]]
    one = lambda: [Request(PROMPTS[2], greedy(5), RouterSpec("demo-gate"))]  # noqa: E731
    assert fixed.generate(one())[0].token_ids == eager.generate(one())[0].token_ids
    gates = {shape.gate for shape in fixed.graphs._shapes.values() if shape.gate is not None}
    assert [g.adapters for g in gates] == [["code", "math", "chat", "multilingual"]]  # other-gate's dropped
    eager.close()
    fixed.close()


@pytest.mark.gpu
@pytest.mark.parametrize("max_batch,copies", [(5, 1), (24, 5)], ids=["decode-kernels", "grouped-kernels"])
def test_cuda_graph_replay_matches_eager_steps(demo, max_batch, copies):
    """Graph replays give the eager engine's tokens, the gate's steps (routed inside the graph)
    too. With 24 rows x max_top_k 4 = 96 pairs the captured LoRA launches take the grouped
    kernels with the fixed tile height."""
    sizes = dict(max_batch=max_batch, max_queue=32, prefill_chunk=64)
    eager = make_engine(demo, decode_graphs="off", **sizes)
    graphs = make_engine(demo, **sizes)
    assert graphs.graphs is not None and graphs.graphs.mode == "graphs"
    vocab = len(graphs.tokenizer)
    want = [o.token_ids for o in eager.generate(_mixed_requests(vocab, copies))]
    got = [o.token_ids for o in graphs.generate(_mixed_requests(vocab, copies))]
    assert got == want
    assert graphs.graphs.captures > 0
    # The gate's steps with a full batch running were captured at the full batch's rows.
    gate_rows = {key[0] for key, shape in graphs.graphs._shapes.items() if key[2] == "gate" and shape.graph is not None}
    assert graphs.graphs.rows_for(min(5 * copies, max_batch)) in gate_rows, gate_rows
    eager.close()
    graphs.close()


@pytest.mark.gpu
def test_adapter_loaded_after_capture_is_used_without_recapture(demo):
    engine = make_engine(demo, max_batch=2, hot_slots=2)
    reference = make_engine(demo, decode_graphs="off", max_batch=2, hot_slots=2)
    prompt = [Request(PROMPTS[0], greedy(8), AdapterSpec("math"))]
    engine.generate(prompt)  # captures the decode shapes this request runs at, with "math" in a slot
    captures = engine.graphs.captures
    assert captures > 0
    # Replace "math" in its slot by "code" (in place), then run "code": same shapes, no capture.
    slot = engine.hotset.slot_of("math")
    engine.remove_adapter("math")
    code = load_peft_adapter(demo / "adapters" / "code", name="code")
    assert engine.load_adapter("code", code) == slot
    got = engine.generate([Request(PROMPTS[0], greedy(8), AdapterSpec("code"))])[0].token_ids
    want = reference.generate([Request(PROMPTS[0], greedy(8), AdapterSpec("code"))])[0].token_ids
    assert got == want
    assert engine.graphs.captures == captures
    engine.close()
    reference.close()


def test_capture_all_runs_every_shape_on_scratch_rows_only(demo):
    """Start-up capture goes through every (batch, length, LoRA or not) shape with padding rows
    only: the KV slots of running sequences are not touched."""
    engine = make_engine(demo, decode_graphs="eager", max_batch=5, max_seq_len=160)
    handle = engine.submit(Request(PROMPTS[0], greedy(3), AdapterSpec("code")))
    handle.result()
    graphs, scratch = engine.graphs, engine.graphs.scratch_slot
    assert set(graphs._shapes) == {(b, n, lora) for b in graphs.batch_buckets for n in graphs.length_buckets
                                   for lora in (False, True)}  # run once at start-up already
    engine.kv_cache.k[:, scratch] = float("nan")
    keys_before, values_before = engine.kv_cache.k.clone(), engine.kv_cache.v.clone()
    with torch.inference_mode():
        assert graphs.capture_all(engine.runner.unrouted_plan) == 0  # eager: nothing to capture
    assert torch.equal(engine.kv_cache.k[:, :scratch], keys_before[:, :scratch])
    assert torch.equal(engine.kv_cache.v[:, :scratch], values_before[:, :scratch])
    assert torch.isfinite(engine.kv_cache.k[0, scratch, :, 0]).all()  # the padding rows wrote here
    # The engine still serves, with the same output as before.
    again = engine.submit(Request(PROMPTS[0], greedy(3), AdapterSpec("code"))).result()
    assert again.token_ids == handle.result().token_ids
    engine.close()


def test_failed_start_up_capture_falls_back_to_eager_steps(demo, monkeypatch, caplog):
    def broken(self, shape, gate=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_forward", broken)
    engine = make_engine(demo, decode_graphs="eager", max_batch=2)
    assert engine.graphs is None and "not permitted" in engine.graph_error
    assert "decode graphs turned off" in caplog.text
    reference = make_engine(demo, decode_graphs="off", max_batch=2)
    request = lambda: Request(PROMPTS[1], greedy(5), AdapterSpec("code"))  # noqa: E731
    assert engine.generate([request()])[0].token_ids == reference.generate([request()])[0].token_ids
    engine.close()
    reference.close()


def test_failed_gate_capture_runs_that_shape_uncaptured(demo, monkeypatch, caplog):
    """A gate's shapes are captured on a serving step; if that capture fails, the step (and the
    later ones at that shape) run the same fixed-shape path uncaptured instead of failing."""
    engine = make_engine(demo, decode_graphs="eager", max_batch=2)
    reference = make_engine(demo, decode_graphs="off", max_batch=2)
    engine.graphs.mode = "graphs"  # as on CUDA, minus the capture, which fails here:
    captured = []

    def broken(self, shape, gate=None):
        captured.append(shape.gate is not None)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture", broken)
    request = lambda: Request(PROMPTS[1], greedy(6), RouterSpec("demo-gate"))  # noqa: E731
    assert engine.generate([request()])[0].token_ids == reference.generate([request()])[0].token_ids
    assert captured == [True]  # tried once; the shape then stays uncaptured
    assert "capture failed for gate router" in caplog.text
    errors = [shape.capture_error for shape in engine.graphs._shapes.values() if shape.gate is not None]
    assert errors and all("not permitted" in e for e in errors)
    engine.close()
    reference.close()


def test_triton_fixed_shape_steps_read_nothing_back_and_match_the_torch_engine(demo, monkeypatch):
    """What a CUDA graph captures, run on CPU through the Triton interpreter: fixed-shape decode
    steps with the Triton kernels, a gate request routed inside the step, and no host read of the
    dispatch counts inside those steps (a capture would fail on one). Tokens equal the torch
    engine's. The step's 8 (token, k) pairs are sent to the grouped kernels, the ones whose tile
    height would otherwise come from the busiest slot's count."""
    monkeypatch.setattr(kernels.meta, "DECODE_MAX_PAIRS", 4)
    requests = lambda: [Request(PROMPTS[0], greedy(4), RouterSpec("demo-gate")),  # noqa: E731
                        Request(PROMPTS[1], greedy(4), AdapterSpec("code"))]
    reference = make_engine(demo, decode_graphs="off", max_batch=2, prefill_chunk=64)
    want = [o.token_ids for o in reference.generate(requests())]
    engine = make_engine(demo, backend="triton", decode_graphs="eager", max_batch=2, prefill_chunk=64)
    inside, steps = [False], []
    host_counts = DispatchMeta.host_counts

    def guarded(meta):
        assert not inside[0], "a fixed-shape step read the dispatch counts back from the device"
        return host_counts(meta)

    monkeypatch.setattr(DispatchMeta, "host_counts", guarded)
    run = engine.graphs.run

    def run_guarded(*args):
        inside[0] = True
        try:
            steps.append(args[4] is not None)
            return run(*args)
        finally:
            inside[0] = False

    engine.graphs.run = run_guarded
    assert [o.token_ids for o in engine.generate(requests())] == want
    assert steps and all(steps), steps  # every decode step fixed, the gate routed inside each
    engine.close()
    reference.close()


def _triton_kernel_option_matches_the_torch_engine(demo, option: str, value: str, requests, **config) -> None:
    """EngineConfig(**{option: value}) on the triton backend gives the torch engine's tokens; on
    the torch backend the option is refused."""
    reference = make_engine(demo, backend="torch", **{**config, "decode_graphs": "off"})
    want = [o.token_ids for o in reference.generate(requests())]
    reference.close()
    engine = make_engine(demo, backend="triton", **{option: value}, **config)
    assert getattr(engine.context.backend, option) == value
    assert [o.token_ids for o in engine.generate(requests())] == want
    engine.close()
    with pytest.raises(ValueError, match=f"{option}='{value}' needs the triton backend"):
        make_engine(demo, backend="torch", **{option: value})


def _record_dense_launches(monkeypatch) -> list:
    """(modules, token count, slot_range) of every lora_dense call from now on."""
    import kernels.lora_dense as dense_module

    launches = []
    real = dense_module.lora_dense

    def recording(*args, **kwargs):
        launches.append((len(args[2]), args[5].num_tokens, kwargs.get("slot_range")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dense_module, "lora_dense", recording)
    return launches


def test_dense_decode_kernel_engine_matches_the_torch_engine(demo, monkeypatch):
    """EngineConfig(decode_kernel="dense"): fixed-shape decode steps run their LoRA through the
    slot-dense kernel (the Triton interpreter on CPU), a gate request routed inside the step;
    tokens equal the torch engine's. On the torch backend the option is refused."""
    launches = _record_dense_launches(monkeypatch)
    requests = lambda: [Request(PROMPTS[0], greedy(4), RouterSpec("demo-gate")),  # noqa: E731
                        Request(PROMPTS[1], greedy(4), AdapterSpec("code"))]
    _triton_kernel_option_matches_the_torch_engine(demo, "decode_kernel", "dense", requests, decode_graphs="eager",
                                                   max_batch=2, prefill_chunk=64)
    assert launches and {modules for modules, _, _ in launches} <= {1, 2, 3}


def test_dense_prefill_kernel_engine_matches_the_torch_engine(demo, monkeypatch):
    """EngineConfig(prefill_kernel="dense"), and the default "auto": a prefill step of a gate
    request (top-2) beside an adapter request, whose slots span at most 2 x top-k, runs its LoRA
    through the slot-dense kernel over token tiles (the Triton interpreter on CPU); tokens equal
    the torch engine's. On the torch backend "dense" is refused."""
    launches = _record_dense_launches(monkeypatch)
    long_prompts = [" ".join([PROMPTS[0]] * 6), " ".join([PROMPTS[1]] * 8)]
    requests = lambda: [Request(long_prompts[0], greedy(3), RouterSpec("demo-gate")),  # noqa: E731
                        Request(long_prompts[1], greedy(3), AdapterSpec("code"))]
    _triton_kernel_option_matches_the_torch_engine(demo, "prefill_kernel", "dense", requests, decode_graphs="off",
                                                   max_batch=2, prefill_chunk=128)
    prefills = [tokens for _, tokens, slot_range in launches if slot_range is not None]
    assert prefills and min(prefills) > 64, launches  # token tiles: more rows than one tile
    # The default ("auto") takes the same kernel for this step.
    launches.clear()
    engine = make_engine(demo, backend="triton", decode_graphs="off", max_batch=2, prefill_chunk=128)
    assert engine.context.backend.prefill_kernel == "auto"
    engine.generate(requests())
    engine.close()
    assert [tokens for _, tokens, slot_range in launches if slot_range is not None] == prefills


def test_dense_base_decode_kernel_engine_matches_the_torch_engine(demo, monkeypatch):
    """EngineConfig(decode_kernel="dense_base"): steps with adapters of at most DECODE_MAX_PAIRS
    (token, choice) pairs (decode steps, and prompts that short) run each projection group's base
    matmul and LoRA as one `lora_dense_base` launch (the Triton interpreter on CPU), at a fixed
    shape (a gate request routed inside the step); longer prefill steps keep their matmuls.
    Tokens equal the torch engine's. (CPU engines pack their base weights for oneDNN, which
    leaves the kernel nothing to read: off here, as on CUDA.)"""
    import kernels.lora_dense_base as base_module

    launches = []
    real = base_module.lora_dense_base
    monkeypatch.setattr(base_module, "lora_dense_base",
                        lambda *args, **kwargs: launches.append((len(args[4]), args[7].num_tokens)) or
                        real(*args, **kwargs))
    requests = lambda: [Request(PROMPTS[0], greedy(4), RouterSpec("demo-gate")),  # noqa: E731
                        Request(PROMPTS[1], greedy(4), AdapterSpec("code"))]
    _triton_kernel_option_matches_the_torch_engine(demo, "decode_kernel", "dense_base", requests,
                                                   decode_graphs="eager", capture_at_start=False, max_batch=2,
                                                   prefill_chunk=64, pack_weights=False)
    assert {modules for modules, _ in launches} == {1, 2, 3}  # o and down, gate/up, q/k/v
    assert min(tokens for _, tokens in launches) <= 2  # decode steps: a bucket of 1 or 2 rows
