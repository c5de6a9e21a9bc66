"""build_dispatch / DispatchBuffers: integer routing ops checked for exact equality."""

import pytest
import torch

from kernels.meta import DECODE_MAX_PAIRS, DispatchBuffers, build_dispatch
from tests.kernels.helpers import DISTRIBUTIONS, routing


def expected_dispatch(slots: list[list[int]], num_slots: int):
    """Sorted pairs, counts and offsets computed the obvious way."""
    flat = [s for row in slots for s in row]
    buckets = {s: [p for p, q in enumerate(flat) if q == s] for s in range(num_slots)}
    sorted_pairs = [p for s in range(num_slots) for p in buckets[s]] + [p for p, q in enumerate(flat) if q < 0]
    counts = [len(buckets[s]) for s in range(num_slots)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return flat, sorted_pairs, counts, offsets


def check_meta(meta, slots: torch.Tensor, weights: torch.Tensor, num_slots: int):
    flat, sorted_pairs, counts, offsets = expected_dispatch(slots.tolist(), num_slots)
    assert (meta.num_tokens, meta.top_k) == tuple(slots.shape)
    assert meta.slots.dtype == torch.int32 and meta.slots.tolist() == flat
    assert meta.weights.dtype == torch.float32 and meta.weights.tolist() == weights.reshape(-1).float().tolist()
    assert meta.sorted_pairs.tolist() == sorted_pairs
    assert meta.slot_counts.tolist() == counts
    assert meta.slot_offsets.tolist() == offsets
    assert meta.host_counts() == counts
    assert meta.max_pairs_per_slot() == max(counts)
    assert meta.host_segments() == [(s, offsets[s], offsets[s + 1]) for s in range(num_slots) if counts[s]]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("num_tokens,top_k,num_slots", [(1, 1, 1), (5, 2, 4), (37, 4, 7), (300, 2, 16)])
def test_build_dispatch_matches_python(dist, num_tokens, top_k, num_slots):
    gen = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    slots = routing(dist, num_tokens, top_k, num_slots, gen)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    check_meta(build_dispatch(slots, weights, num_slots), slots, weights, num_slots)


def test_no_adapter_tokens_sort_last_and_empty_slots_have_zero_count():
    slots = torch.tensor([[-1, 2], [0, -1], [2, 2], [-1, -1]])
    weights = torch.rand(4, 2)
    meta = build_dispatch(slots, weights, 4)
    check_meta(meta, slots, weights, 4)
    assert meta.sorted_pairs.tolist() == [2, 1, 4, 5, 0, 3, 6, 7]
    assert meta.slot_counts.tolist() == [1, 0, 3, 0]
    assert meta.slot_offsets.tolist() == [0, 1, 1, 4, 4]
    assert meta.host_segments() == [(0, 0, 1), (2, 1, 4)]


def test_all_pairs_without_adapter():
    slots = torch.full((3, 2), -1)
    meta = build_dispatch(slots, torch.ones(3, 2), 5)
    check_meta(meta, slots, torch.ones(3, 2), 5)
    assert meta.max_pairs_per_slot() == 0 and meta.host_segments() == []


def test_dispatch_buffers_reused_in_place():
    buffers = DispatchBuffers(max_tokens=64, max_k=4, num_slots=6)
    fields = ("slots", "weights", "sorted_pairs", "slot_counts", "slot_offsets")
    ptrs = [getattr(buffers, f).data_ptr() for f in fields]
    gen = torch.Generator().manual_seed(3)
    for num_tokens, top_k, dist in [(64, 4, "uniform"), (10, 2, "with_none"), (64, 4, "zipf"), (1, 1, "one")]:
        slots = routing(dist, num_tokens, top_k, 6, gen)
        weights = torch.rand(num_tokens, top_k, generator=gen)
        meta = buffers.build(slots, weights)
        check_meta(meta, slots, weights, 6)
        got = [getattr(meta, f).data_ptr() for f in fields]
        assert got == ptrs, "dispatch buffers were reallocated"


def test_dispatch_buffers_keep_weight_grad():
    buffers = DispatchBuffers(8, 2, 3)
    weights = torch.rand(4, 2, requires_grad=True)
    meta = buffers.build(torch.zeros(4, 2, dtype=torch.int32), weights)
    assert meta.weights.requires_grad
    meta.weights.sum().backward()
    assert torch.equal(weights.grad, torch.ones(4, 2))


@pytest.mark.parametrize("num_tokens,top_k,num_slots", [(65, 1, 4), (8, 3, 4), (8, 2, 5)])
def test_step_that_does_not_fit_raises(num_tokens, top_k, num_slots):
    buffers = DispatchBuffers(max_tokens=64, max_k=2, num_slots=4)
    slots = torch.zeros(num_tokens, top_k, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not fit"):
        build_dispatch(slots, torch.ones(num_tokens, top_k), num_slots, out=buffers)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        build_dispatch(torch.zeros(4, dtype=torch.int32), torch.ones(4), 2)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        build_dispatch(torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 1), 2)
    with pytest.raises(ValueError, match=">= 1"):
        DispatchBuffers(0, 1, 1)


def test_decode_threshold():
    assert build_dispatch(torch.zeros(DECODE_MAX_PAIRS, 1), torch.ones(DECODE_MAX_PAIRS, 1), 1).is_decode
    over = DECODE_MAX_PAIRS // 2 + 1
    assert not build_dispatch(torch.zeros(over, 2), torch.ones(over, 2), 1).is_decode


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("num_tokens,top_k,num_slots", [(1, 1, 1), (5, 2, 4), (37, 4, 7), (300, 2, 16)])
def test_build_host_matches_build(dist, num_tokens, top_k, num_slots):
    """Routes known on the host sort and count on the host into the same buffers, and the meta
    answers host_counts without reading the device."""
    gen = torch.Generator().manual_seed(num_tokens * 17 + top_k)
    slots = routing(dist, num_tokens, top_k, num_slots, gen)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    buffers = DispatchBuffers(512, 4, num_slots)
    buffers.sorted_pairs.fill_(-7)  # stale contents from an earlier step
    meta = buffers.build_host(slots.reshape(-1).tolist(), weights.reshape(-1).tolist(), num_tokens, top_k)
    assert meta._host_counts is not None and meta.host_route == (slots.reshape(-1).tolist(), weights.reshape(-1).tolist())
    check_meta(meta, slots, weights, num_slots)
    assert meta.slots.data_ptr() == buffers.slots.data_ptr()  # the buffers a graph would read


def test_build_host_rejects_bad_input():
    buffers = DispatchBuffers(8, 2, 4)
    with pytest.raises(ValueError, match="outside"):
        buffers.build_host([0, 4], [1.0, 1.0], 2, 1)
    with pytest.raises(ValueError, match="expected 4 slots"):
        buffers.build_host([0, 1], [1.0, 1.0], 2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        buffers.build_host([0] * 9, [1.0] * 9, 9, 1)
