"""The KV-cache path: chunked prefill + decode of several sequences in one flat batch gives the
same logits as a dense forward over each full sequence."""

from __future__ import annotations

import pytest
import torch

from molora_core.model import KVCache, StepBatch, load_model
from molora_core.model.attention import AttentionMeta
from tests.molora_core.test_decoder import FP32_ATOL, ids_for, make_checkpoint
from tests.molora_core.test_decoder_loader import save_tiny_tokenizer

# Each step: (sequence, first new position, number of new tokens). Mixes two-chunk prefills, a
# fresh prompt arriving while others decode, decode steps of different context lengths, a
# multi-token append after decoding, and a step whose spans are not in sequence order.
SCHEDULE = [
    [("a", 0, 4), ("b", 0, 6)],
    [("a", 4, 3), ("b", 6, 6)],
    [("a", 7, 1), ("c", 0, 5), ("b", 12, 1)],
    [("a", 8, 1), ("b", 13, 1), ("c", 5, 1)],
    [("c", 6, 3), ("a", 9, 1)],
    [("a", 10, 1), ("b", 14, 1), ("c", 9, 1)],
]
LENGTHS = {"a": 11, "b": 15, "c": 10}
SLOTS = {"a": 3, "b": 0, "c": 2}
# Decode rows in their slots' order: steps 3 and 4 send them straight through one SDPA call,
# with a prefill beside them and alone (AttentionMeta.decode_direct).
IN_ORDER = {"a": 0, "b": 1, "c": 2}


def run_schedule(model, seqs, cache, reorder_last=True, slots=SLOTS):
    """Run SCHEDULE through model.forward; return {seq: logits [len, V]} gathered per position."""
    out = {name: torch.full((n, model.config.vocab_size), float("nan")) for name, n in LENGTHS.items()}
    for step_no, step in enumerate(SCHEDULE):
        spans = step
        ids = torch.cat([seqs[name][pos : pos + n] for name, pos, n in spans])
        batch = StepBatch.build([slots[name] for name, _, _ in spans], [n for _, _, n in spans],
                                [pos + n for _, pos, n in spans])
        if reorder_last and step_no == len(SCHEDULE) - 1:
            # Same tokens, spans listed in a different order than they lie in the flat batch.
            order = [2, 0, 1]
            batch = StepBatch(*(tuple(getattr(batch, f)[i] for i in order)
                                for f in ("slots", "starts", "num_new", "context_lens")))
            spans = [spans[i] for i in order]
        seen = []
        with torch.no_grad():
            logits = model(ids, batch.positions(), batch, cache, on_embeddings=seen.append)
            last = model(ids, batch.positions(), batch, _copy(cache), logits="last")
        assert len(seen) == 1 and seen[0].shape == (ids.shape[0], model.config.hidden_size)
        for (name, pos, n), start in zip(spans, batch.starts):
            out[name][pos : pos + n] = logits[start : start + n]
        assert torch.allclose(last, logits[batch.last_token_indices()], atol=1e-6)
    return out


def _copy(cache: KVCache) -> KVCache:
    """A throwaway copy, so the second (logits="last") call cannot disturb the real cache."""
    clone = KVCache(cache.num_layers, cache.max_seqs, cache.max_seq_len, cache.num_kv_heads, cache.head_dim,
                    cache.dtype, cache.device)
    clone.k.copy_(cache.k)
    clone.v.copy_(cache.v)
    return clone


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                       "rope_theta": 10000.0}}),
        ("qwen3", {}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        ("mistral", {"sliding_window": 5}),
    ],
    ids=["llama3-rope", "qwen3", "qwen2-sliding", "mistral-sliding"],
)
@pytest.mark.parametrize("slots", [SLOTS, IN_ORDER], ids=["slots-shuffled", "slots-in-row-order"])
def test_chunked_prefill_and_decode_match_dense(tmp_path, family, overrides, slots):
    _, path = make_checkpoint(tmp_path, family, **overrides)
    model = load_model(path, dtype=torch.float32)
    seqs = {name: ids_for(1, n, seed=i)[0] for i, (name, n) in enumerate(LENGTHS.items())}
    cache = KVCache.for_model(model, max_seqs=4, max_seq_len=16)
    got = run_schedule(model, seqs, cache, slots=slots)
    worst = 0.0
    for name, ids in seqs.items():
        with torch.no_grad():
            want = model.forward_dense(ids[None])[0]
        worst = max(worst, (got[name] - want).abs().max().item())
    assert worst <= FP32_ATOL, f"max abs diff {worst:.3g}"


def test_cache_allocated_once(tmp_path):
    _, path = make_checkpoint(tmp_path, "llama")
    model = load_model(path)
    cache = KVCache.for_model(model, max_seqs=4, max_seq_len=16)
    pointers = (cache.k.data_ptr(), cache.v.data_ptr())
    assert cache.k.shape == (2, 4, 2, 16, 16) and cache.dtype == torch.float32
    seqs = {name: ids_for(1, n, seed=i)[0] for i, (name, n) in enumerate(LENGTHS.items())}
    run_schedule(model, seqs, cache, reorder_last=False)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == pointers


def test_bad_batches_are_refused(tmp_path):
    _, path = make_checkpoint(tmp_path, "llama")
    model = load_model(path)
    cache = KVCache.for_model(model, max_seqs=2, max_seq_len=8)
    ids = torch.zeros(4, dtype=torch.int64)
    cases = {
        "covers 3 tokens": StepBatch.build([0], [3], [3]),
        "slot 5 outside": StepBatch.build([5], [4], [4]),
        "exceeds the KV cache's max_seq_len": StepBatch.build([0], [4], [9]),
        "slot twice": StepBatch.build([1, 1], [2, 2], [2, 2]),
    }
    for message, batch in cases.items():
        with pytest.raises(ValueError, match=message):
            model(ids, torch.arange(4), batch, cache)
    with pytest.raises(ValueError, match="no KV cache"):
        model(ids, torch.arange(4), StepBatch.build([0], [4], [6]), None)


class _Recording(torch.nn.Module):
    """Stands in for a LoRA-aware layer: wraps the base nn.Linear and records input shapes."""

    def __init__(self, base: torch.nn.Linear, seen: list):
        super().__init__()
        self.base, self.seen = base, seen

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.base(x)


def test_projections_replaceable_by_name(tmp_path):
    """A LoRA layer swapped in by HF module path is used, and sees flat tokens [T, D_in]."""
    _, path = make_checkpoint(tmp_path, "qwen3")
    model = load_model(path)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(targets) == 2 * 7 and "model.layers.1.mlp.down_proj" in targets
    seen = []
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _Recording(model.get_submodule(name), seen))
    batch = StepBatch.build([1, 0], [5, 3], [5, 3])
    ids = torch.arange(8)
    with torch.no_grad():
        model(ids, batch.positions(), batch, KVCache.for_model(model, 2, 8))
    assert len(seen) == len(targets)
    assert all(len(shape) == 2 and shape[0] == 8 for shape in seen)


def test_decode_reads_the_cache_in_place_past_idle_slots(tmp_path):
    """Decode attention runs over the slot span [lo, hi) of the cache itself: slots in the span
    that are not decoding (here holding NaN) must not leak into the decoding rows."""
    _, path = make_checkpoint(tmp_path, "qwen3")
    model = load_model(path, dtype=torch.float32)
    cache = KVCache.for_model(model, max_seqs=5, max_seq_len=16)
    cache.k[:, 1:3] = float("nan")
    cache.v[:, 1:3] = float("nan")
    seqs = {"a": ids_for(1, 9, seed=1)[0], "b": ids_for(1, 7, seed=2)[0]}
    slots = {"a": 3, "b": 0}
    with torch.no_grad():
        for name in seqs:  # prefill all but the last token
            n = len(seqs[name]) - 1
            batch = StepBatch.build([slots[name]], [n], [n])
            model(seqs[name][:n], batch.positions(), batch, cache)
        ids = torch.stack([seqs["a"][-1], seqs["b"][-1]])
        batch = StepBatch.build([3, 0], [1, 1], [9, 7])  # rows in the opposite order of their slots
        logits = model(ids, batch.positions(), batch, cache)
        for row, name in enumerate(["a", "b"]):
            want = model.forward_dense(seqs[name][None])[0, -1]
            assert (logits[row] - want).abs().max().item() <= FP32_ATOL


def test_decode_rows_skip_the_span_scatter_only_when_in_slot_order():
    """AttentionMeta says when decode rows are every token (decode_all) and when they already sit
    in their span's slot order (decode_direct): the two shortcuts the attention takes."""
    def flags(slots, num_new, context_lens):
        meta = AttentionMeta.build(StepBatch.build(slots, num_new, context_lens), torch.device("cpu"), True)
        return meta.decode_all, meta.decode_direct

    assert flags([0, 1, 2], [1, 1, 1], [5, 3, 9]) == (True, True)
    assert flags([4, 5], [1, 1], [5, 3]) == (True, True)  # a span that starts past slot 0
    assert flags([1, 0, 2], [1, 1, 1], [5, 3, 9]) == (True, False)  # rows out of slot order
    assert flags([0, 2], [1, 1], [5, 3]) == (True, False)  # an idle slot inside the span
    assert flags([0, 1, 2], [1, 4, 1], [5, 4, 9]) == (False, False)  # a prefill between: slots 0 and 2
    assert flags([0, 2, 1], [1, 4, 1], [5, 4, 9]) == (False, True)  # decode rows: slots 0 and 1
    assert flags([0, 1], [1, 1], [1, 3]) == (False, True)  # a one-token prompt is a prefill; slot 1 decodes alone
    # Listed out of flat order: sequence 0's token is flat token 1, so decode row 0 is not token 0.
    batch = StepBatch((0, 1), (1, 0), (1, 1), (5, 3))
    meta = AttentionMeta.build(batch, torch.device("cpu"), True)
    assert (meta.decode_all, meta.decode_direct) == (False, True)


# Fresh prompts of one length side by side run one SDPA call together (AttentionMeta.prefill_runs):
# a step with two such runs split by a continuation chunk, a longer prompt between them, a decode
# row, and a one-token prompt; in the sliding-window families the 5-token prompt is longer than
# the window, so its run takes the per-sequence path with a mask.
RUN_SCHEDULE = [
    [("d", 0, 4), ("c", 0, 4)],
    [("d", 4, 1), ("p1", 0, 3), ("p2", 0, 3), ("p3", 0, 3), ("c", 4, 4), ("p4", 0, 5), ("p5", 0, 3), ("p6", 0, 3),
     ("p7", 0, 1)],
    [("d", 5, 1), ("p1", 3, 1), ("p2", 3, 1), ("p3", 3, 1), ("c", 8, 1), ("p4", 5, 1), ("p5", 3, 1), ("p6", 3, 1),
     ("p7", 1, 1)],
]


@pytest.mark.parametrize(
    "family,overrides",
    [("qwen3", {}), ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
     ("mistral", {"sliding_window": 4})],
    ids=["qwen3", "qwen2-sliding", "mistral-sliding"],
)
def test_fresh_prompts_of_one_length_attend_together(tmp_path, family, overrides):
    _, path = make_checkpoint(tmp_path, family, **overrides)
    model = load_model(path, dtype=torch.float32)
    names = ["d", "c", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]
    lengths = {name: 1 + max(pos + n for step in RUN_SCHEDULE for s, pos, n in step if s == name) for name in names}
    seqs = {name: ids_for(1, lengths[name], seed=i)[0] for i, name in enumerate(names)}
    slots = {name: i for i, name in enumerate(reversed(names))}
    cache = KVCache.for_model(model, max_seqs=len(names), max_seq_len=16)
    got = {name: torch.full((lengths[name] - 1, model.config.vocab_size), float("nan")) for name in names}
    for step in RUN_SCHEDULE:
        ids = torch.cat([seqs[name][pos : pos + n] for name, pos, n in step])
        batch = StepBatch.build([slots[name] for name, _, _ in step], [n for _, _, n in step],
                                [pos + n for _, pos, n in step])
        with torch.no_grad():
            logits = model(ids, batch.positions(), batch, cache)
        for (name, pos, n), start in zip(step, batch.starts):
            got[name][pos : pos + n] = logits[start : start + n]
    for name in names:
        with torch.no_grad():
            want = model.forward_dense(seqs[name][None, :-1])[0]
        assert (got[name] - want).abs().max().item() <= FP32_ATOL, name


def test_fresh_prompts_are_grouped_into_runs():
    """Runs are fresh prompts (nothing cached) of one length, adjacent in the flat batch; a
    continuation chunk, a decode row or another length ends a run."""
    num_new = [1, 3, 3, 3, 4, 5, 3, 3, 1]
    context = [5, 3, 3, 3, 8, 5, 3, 3, 1]
    meta = AttentionMeta.build(StepBatch.build(range(9), num_new, context), torch.device("cpu"), True)
    assert meta.prefill_runs == [(1, 3, (1, 2, 3)), (14, 5, (5,)), (19, 3, (6, 7)), (25, 1, (8,))]
    assert meta.prefill_rest == [4]
    # Listed out of flat order: sequence 1's tokens come first, so the two are not side by side as listed.
    meta = AttentionMeta.build(StepBatch((0, 1), (3, 0), (3, 3), (3, 3)), torch.device("cpu"), True)
    assert meta.prefill_runs == [(3, 3, (0,)), (0, 3, (1,))]


def test_dynamic_rope_prompts_prefilled_in_chunks_generate_as_transformers(tmp_path):
    """Dynamic NTK scales a prompt's frequencies for its whole length: a prompt longer than
    max_position_embeddings, prefilled 8 tokens a step, generates transformers' greedy tokens
    with its log-probabilities (each chunk scaled for the length after it, they were off); the
    engine shares no prefixes under it."""
    from molora_core.engine import Engine, EngineConfig, Request, SamplingParams

    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    hf, path = make_checkpoint(tmp_path, "llama", rope_parameters=rope, max_position_embeddings=16)
    save_tiny_tokenizer(path)
    ids = ids_for(1, 40)[0].tolist()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    want = gen.sequences[0, 40:].tolist()
    want_logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(gen.logits, want)]
    engine = Engine(path, EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=8))
    for _ in range(2):
        out = engine.submit(Request(ids, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0))).result()
        assert list(out.token_ids) == want and out.cached_tokens == 0
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]), torch.tensor(want_logprobs),
                                   atol=FP32_ATOL, rtol=0)
