"""Fixed-shape decode steps (molora_core.engine.graphs): padded rows, buffers at fixed addresses,
and on CUDA the captured graphs, against the ordinary step.

On CPU the fixed-shape path runs uncaptured (decode_graphs="eager"), which checks everything but
the capture itself; the `gpu` tests capture and replay.
"""

from __future__ import annotations

import pytest
import torch

from molora_core.engine import Request, RouterSpec
from molora_core.engine.graphs import DecodeGraphs, batch_buckets, graph_mode, length_buckets
from molora_core.model import KVCache, StepBatch, load_model
from molora_core.model.attention import AttentionMeta
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec, BaseSpec, MixtureSpec, VocabSpec
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


def test_static_decode_forward_matches_the_ordinary_step(tmp_path):
    """Rows padded to a bucket, a scratch slot, keys read up to a length bucket: the real rows'
    logits equal an ordinary decode step's."""
    _, path = make_checkpoint(tmp_path, "qwen3")
    model = load_model(path, dtype=torch.float32)
    cache = KVCache.for_model(model, max_seqs=5, max_seq_len=32)  # slot 4 is the scratch slot
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

        kv_slots = torch.tensor(slots + [4], dtype=torch.int64)  # one padding row
        kv_lens = torch.ones(5, dtype=torch.int64)
        kv_lens[slots] = torch.tensor(lens)
        meta = AttentionMeta.static_decode(kv_slots, kv_lens, 16)
        ids = torch.cat([last, torch.zeros(1, dtype=torch.int64)])
        positions = torch.tensor([n - 1 for n in lens] + [0])
        got = model.forward_static_decode(ids, positions, meta, cache)
    assert got.shape == (4, model.config.vocab_size)
    assert (got[:3] - want).abs().max().item() <= FP32_ATOL


def _mixed_requests(tokenizer_vocab, copies=1, gate=True):
    specs = [BaseSpec(), AdapterSpec("code"), MixtureSpec(("math", "chat"), (0.7, 0.3)),
             VocabSpec(((0, 300, "code"), (300, tokenizer_vocab, "multilingual"))), RouterSpec("demo-gate")]
    if not gate:
        specs.pop()
    # The gate request (last) stops first: later decode steps need no hidden state to route.
    return [Request(PROMPTS[i % len(PROMPTS)], greedy(12 - 2 * i), spec)
            for _ in range(copies) for i, spec in enumerate(specs)]


@pytest.mark.parametrize("max_batch,copies", [(5, 1), (24, 5)])
def test_fixed_shape_engine_generates_what_the_ordinary_engine_does(demo, max_batch, copies):
    """Mixed routing, padding rows, and (24-row case) decode steps past 16 sequences."""
    sizes = dict(max_batch=max_batch, max_queue=32, prefill_chunk=5 if max_batch == 5 else 64)
    eager = make_engine(demo, decode_graphs="off", **sizes)
    fixed = make_engine(demo, decode_graphs="eager", **sizes)
    assert eager.graphs is None and isinstance(fixed.graphs, DecodeGraphs)
    assert fixed.kv_cache.max_seqs == max_batch + 1  # one scratch slot
    calls = []
    run = fixed.graphs.run
    fixed.graphs.run = lambda *a: calls.append(len(a[0])) or run(*a)
    vocab = len(fixed.tokenizer)
    gate = max_batch == 5  # the big batch leaves the gate out so whole decode steps take the fixed shape
    want = [o.token_ids for o in eager.generate(_mixed_requests(vocab, copies, gate))]
    got = [o.token_ids for o in fixed.generate(_mixed_requests(vocab, copies, gate))]
    assert got == want
    # Steps with a gate request route from the hidden state and run eagerly; once it has
    # finished, decode steps of the others take the fixed shape, some with padding rows.
    assert len(calls) >= 3 and any(fixed.graphs.rows_for(n) > n for n in calls), calls
    if max_batch == 24:
        assert max(calls) > 16, calls  # the 24-row bucket ran
    eager.close()
    fixed.close()


@pytest.mark.gpu
@pytest.mark.parametrize("max_batch,copies", [(5, 1), (24, 5)], ids=["decode-kernels", "grouped-kernels"])
def test_cuda_graph_replay_matches_eager_steps(demo, max_batch, copies):
    """Graph replays give the eager engine's tokens. With 24 rows x max_top_k 4 = 96 pairs the
    captured LoRA launches take the grouped kernels with the fixed tile height."""
    sizes = dict(max_batch=max_batch, max_queue=32, prefill_chunk=64)
    eager = make_engine(demo, decode_graphs="off", **sizes)
    graphs = make_engine(demo, **sizes)
    assert graphs.graphs is not None and graphs.graphs.mode == "graphs"
    vocab = len(graphs.tokenizer)
    want = [o.token_ids for o in eager.generate(_mixed_requests(vocab, copies, gate=False))]
    got = [o.token_ids for o in graphs.generate(_mixed_requests(vocab, copies, gate=False))]
    assert got == want
    assert graphs.graphs.captures > 0
    assert max(rows for rows, _, _ in graphs.graphs._shapes) == graphs.graphs.rows_for(4 * copies)
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
        assert graphs.capture_all(engine._unrouted_plan) == 0  # eager: nothing to capture
    assert torch.equal(engine.kv_cache.k[:, :scratch], keys_before[:, :scratch])
    assert torch.equal(engine.kv_cache.v[:, :scratch], values_before[:, :scratch])
    assert torch.isfinite(engine.kv_cache.k[0, scratch, :, 0]).all()  # the padding rows wrote here
    # The engine still serves, with the same output as before.
    again = engine.submit(Request(PROMPTS[0], greedy(3), AdapterSpec("code"))).result()
    assert again.token_ids == handle.result().token_ids
    engine.close()


def test_failed_start_up_capture_falls_back_to_eager_steps(demo, monkeypatch, caplog):
    def broken(self, shape):
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
