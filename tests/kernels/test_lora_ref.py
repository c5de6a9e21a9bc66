"""The pure-torch ops (the CPU backend and the Triton oracle) against a naive per-pair loop."""

import pytest
import torch

from kernels.lora_ref import _auto_path, lora_apply_ref, lora_apply_shared_ref, lora_expand_ref, lora_shrink_ref
from kernels.meta import DispatchBuffers, build_dispatch
from tests.kernels.helpers import DISTRIBUTIONS, DTYPES, assert_close, make_problem, naive_expand, naive_shrink

# (T, K, S, D_in, D_out, R): decode-sized (N <= 64) and prefill-sized steps.
SHAPES = [(1, 1, 3, 64, 48, 16), (9, 4, 5, 96, 64, 32), (40, 2, 8, 64, 128, 64), (150, 1, 6, 32, 48, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}K{}S{}D{}x{}R{}".format(*s))
def test_shrink_expand_ref_match_naive(shape, dist, dtype):
    p = make_problem(*shape, dtype=dtype, dist=dist, seed=sum(shape))
    h = lora_shrink_ref(p.x, p.lora_a, p.ranks, p.meta)
    h_naive = naive_shrink(p.x, p.lora_a, p.ranks, p.slots)
    assert h.dtype == torch.float32
    assert_close(h, h_naive, dtype, "lora_shrink_ref")
    # Padding columns and no-adapter pairs are exactly zero, not merely small.
    assert torch.equal(h[h_naive == 0], torch.zeros_like(h[h_naive == 0]))

    out = lora_expand_ref(h, p.lora_b, p.ranks, p.scales, p.meta, p.out.clone())
    assert out.dtype == dtype
    expected = naive_expand(h_naive, p.lora_b, p.ranks, p.scales, p.slots, p.weights, p.out)
    assert_close(out, expected, dtype, "lora_expand_ref")


@pytest.mark.parametrize("path", ["decode", "prefill", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}K{}S{}D{}x{}R{}".format(*s))
def test_apply_ref_matches_naive(shape, dist, dtype, path):
    # Finite garbage past each slot's rank: both paths must ignore it, not rely on zeros.
    p = make_problem(*shape, dtype=dtype, dist=dist, seed=sum(shape) + 1, pad_value=3.0)
    expected = naive_expand(
        naive_shrink(p.x, p.lora_a, p.ranks, p.slots), p.lora_b, p.ranks, p.scales, p.slots, p.weights, p.out
    )
    out = p.out.clone()
    assert lora_apply_ref(p.x, p.lora_a, p.lora_b, p.ranks, p.scales, p.meta, out, path=path) is out
    assert_close(out, expected, dtype, f"lora_apply_ref ({path})")


def test_apply_ref_prefill_ignores_padding_contents():
    # The segment walk never reads past a slot's rank, so even NaN padding stays out. (The dense
    # path weighs padding by zero: finite padding is ignored, as the test above checks; the
    # hot-set keeps padding at zero.)
    p = make_problem(150, 1, 6, 32, 48, 16, torch.float32, "uniform", pad_value=float("nan"))
    assert not p.meta.is_decode
    out = lora_apply_ref(p.x, p.lora_a, p.lora_b, p.ranks, p.scales, p.meta, p.out.clone(), path="prefill")
    expected = naive_expand(
        naive_shrink(p.x, p.lora_a, p.ranks, p.slots), p.lora_b, p.ranks, p.scales, p.slots, p.weights, p.out
    )
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("num_tokens,top_k", [(6, 2), (100, 2)], ids=["decode-size", "prefill-size"])
def test_apply_ref_gradients_match_naive(num_tokens, top_k, path):
    p = make_problem(num_tokens, top_k, 4, 32, 24, 8, torch.float64, "with_none", seed=5, pad_value=0.0)
    x = p.x.clone().requires_grad_(True)
    weights = p.weights.double().clone().requires_grad_(True)
    meta = build_dispatch(p.slots, weights, 4)
    assert meta.is_decode == (num_tokens * top_k <= 64)
    grad_out = torch.randn_like(p.out)
    (lora_apply_ref(x, p.lora_a, p.lora_b, p.ranks, p.scales, meta, p.out.clone(), path=path) * grad_out).sum().backward()

    x2 = p.x.clone().requires_grad_(True)
    w2 = p.weights.double().clone().requires_grad_(True)
    h = naive_shrink(x2, p.lora_a, p.ranks, p.slots)
    (naive_expand(h, p.lora_b, p.ranks, p.scales, p.slots, w2, p.out) * grad_out).sum().backward()
    # meta.weights is float32 by design, so float64 data meets float32 accuracy here.
    assert_close(x.grad, x2.grad, torch.float32)
    assert_close(weights.grad, w2.grad, torch.float32)


def test_no_adapter_step_leaves_out_unchanged():
    p = make_problem(8, 2, 3, 32, 32, 8, torch.float32, "uniform")
    meta = build_dispatch(torch.full((8, 2), -1), p.weights, 3)
    for op in ("apply", "shrink_expand"):
        out = p.out.clone()
        if op == "apply":
            lora_apply_ref(p.x, p.lora_a, p.lora_b, p.ranks, p.scales, meta, out)
        else:
            h = lora_shrink_ref(p.x, p.lora_a, p.ranks, meta)
            assert torch.equal(h, torch.zeros_like(h))
            lora_expand_ref(h, p.lora_b, p.ranks, p.scales, meta, out)
        assert torch.equal(out, p.out)


@pytest.mark.parametrize("unit_weights", [True, False], ids=["unit-weights", "weighted"])
@pytest.mark.parametrize(
    "blocks",
    [[(0, 40)], [(0, 10), (1, 20), (2, 5), (-1, 7), (0, 3)], [(s % 3, 2) for s in range(30)]],
    ids=["one-run", "few-runs", "many-runs"],
)
def test_apply_ref_contiguous_runs_match_naive(blocks, unit_weights):
    """Requests grouped by adapter give contiguous token runs, taken as views; the scattered
    case (more than MAX_RUNS runs per slot) falls back to gather and scatter."""
    gen = torch.Generator().manual_seed(3)
    slots = torch.cat([torch.full((n, 1), s, dtype=torch.int32) for s, n in blocks])
    num_tokens = slots.shape[0]
    weights = torch.ones(num_tokens, 1) if unit_weights else torch.rand(num_tokens, 1, generator=gen)
    lora_a = torch.randn(3, 16, 32, generator=gen)
    lora_b = torch.randn(3, 24, 16, generator=gen)
    ranks = torch.tensor([16, 4, 8], dtype=torch.int32)
    scales = torch.tensor([0.5, 2.0, 1.0])
    x = torch.randn(num_tokens, 32, generator=gen)
    out0 = torch.randn(num_tokens, 24, generator=gen)
    meta = build_dispatch(slots, weights, 3)
    out = lora_apply_ref(x, lora_a, lora_b, ranks, scales, meta, out0.clone(), path="prefill")
    expected = naive_expand(naive_shrink(x, lora_a, ranks, slots), lora_b, ranks, scales, slots, weights, out0)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("meta_from", ["device", "host"])
@pytest.mark.parametrize("path", ["auto", "decode", "prefill", "dense"])
@pytest.mark.parametrize("b_layout", ["slot_major", "rank_major"])
@pytest.mark.parametrize("dist", ["one", "uniform", "with_none", "empty_slots"])
@pytest.mark.parametrize("shape", [(9, 2, 5, 48, 16), (150, 1, 6, 32, 16), (40, 2, 8, 64, 32)],
                         ids=lambda s: "T{}K{}S{}D{}R{}".format(*s))
def test_apply_shared_matches_each_module_naive(shape, dist, b_layout, path, meta_from):
    """Three modules reading one x (q/k/v), written into column slices of one output, equal each
    module's naive delta; padding past rank holds finite garbage the dense path must weigh by 0.
    meta_from "host": the plan's host-built dispatch (constant routes), whose per-step values
    (segments, dense coefficients) come from host lists instead of the device."""
    num_tokens, top_k, num_slots, d_in, rank = shape
    d_outs = (40, 24, 24)
    problems = [
        make_problem(num_tokens, top_k, num_slots, d_in, d_out, rank, torch.float32, dist, seed=7, pad_value=3.0)
        for d_out in d_outs
    ]
    # Same x, routing and ranks for every module (make_problem is seeded alike); own weights.
    gen = torch.Generator().manual_seed(3)
    lora_a_group = torch.stack([p.lora_a + 0.1 * g for g, p in enumerate(problems)])  # [G, S, R, D_in]
    lora_b_list = []
    for p in problems:
        b = p.lora_b + torch.randn(p.lora_b.shape, generator=gen) * 0.01
        if b_layout == "rank_major":
            b = b.transpose(1, 2).contiguous().transpose(1, 2)  # [S, D_out, R] view of [S, R, D_out]
        lora_b_list.append(b)
    ranks_group = torch.stack([p.ranks for p in problems])
    scales_group = torch.stack([p.scales * (g + 1) for g, p in enumerate(problems)])
    p0 = problems[0]
    out = torch.randn(num_tokens, sum(d_outs), generator=gen)
    outs = list(out.clone().split(d_outs, dim=1))  # strided column slices of one tensor
    meta = p0.meta
    if meta_from == "host":
        buffers = DispatchBuffers(num_tokens, top_k, num_slots)
        meta = buffers.build_host(p0.slots.reshape(-1).tolist(), p0.weights.reshape(-1).tolist(), num_tokens, top_k)
    lora_apply_shared_ref(p0.x, lora_a_group, lora_b_list, ranks_group, scales_group, meta, outs, path=path)
    for g, (ours, base) in enumerate(zip(outs, out.split(d_outs, dim=1))):
        h = naive_shrink(p0.x, lora_a_group[g], ranks_group[g], p0.slots)
        expected = naive_expand(h, lora_b_list[g], ranks_group[g], scales_group[g], p0.slots, p0.weights, base)
        assert_close(ours, expected, torch.float32, f"module {g} ({path}, {b_layout})")


@pytest.mark.parametrize("b_layout", ["slot_major", "rank_major"])
def test_dense_cache_keeps_views_that_see_in_place_writes(b_layout):
    """The dense path keeps its per-span views in the caller's cache only when they are views of
    the buffers (rank-major lora_b; a slot-major one is copied per call, so it is not kept), and a
    slot written in place afterwards (an adapter load) reaches the next call through them."""
    p = make_problem(16, 2, 4, 32, 24, 8, torch.float32, "uniform", seed=5, pad_value=3.0)
    lora_a = p.lora_a[None].clone()  # [1, S, R, D_in]
    lora_b = p.lora_b.clone()
    if b_layout == "rank_major":
        lora_b = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    ranks, scales = p.ranks[None].clone(), p.scales[None].clone()
    in_rank = torch.arange(lora_a.shape[2]) < ranks[..., None]
    rank_scales = torch.where(in_rank, scales[..., None], 0.0)  # as the hot-set keeps it

    def run(cache):
        out = p.out.clone()
        lora_apply_shared_ref(p.x, lora_a, [lora_b], ranks, scales, p.meta, [out], path="dense",
                              rank_scales=rank_scales, cache=cache)
        return out

    def expected():
        h = naive_shrink(p.x, lora_a[0], ranks[0], p.slots)
        return naive_expand(h, lora_b, ranks[0], scales[0], p.slots, p.weights, p.out)

    cache = {}
    assert_close(run(cache), expected(), torch.float32)
    assert len(cache) == (1 if b_layout == "rank_major" else 0)
    # Load another adapter into a routed slot of nonzero rank in place, with another scale: the
    # kept views see it.
    slot = 2
    assert ranks[0, slot] > 0 and (p.slots == slot).any()
    before = run(cache)
    gen = torch.Generator().manual_seed(9)
    lora_a[0, slot].copy_(torch.randn(lora_a.shape[2:], generator=gen))
    lora_b[slot].copy_(torch.randn(lora_b.shape[1:], generator=gen))
    scales[0, slot] = 3.0
    rank_scales[0, slot] = torch.where(in_rank[0, slot], 3.0, 0.0)
    after = run(cache)
    assert not torch.allclose(after, before)
    assert_close(after, expected(), torch.float32, "after an in-place load")


def test_auto_path_on_cpu():
    one = make_problem(16, 1, 4, 32, 32, 8, torch.float32, "one")  # every token on slot 0
    scattered = make_problem(16, 2, 4, 32, 32, 8, torch.float32, "uniform")
    scattered_prefill = make_problem(300, 2, 4, 32, 32, 8, torch.float32, "uniform")
    one_prefill = make_problem(300, 1, 4, 32, 32, 8, torch.float32, "one")
    assert _auto_path(one.meta, one.x) == "prefill"  # one contiguous run: two matmuls on views
    assert _auto_path(one_prefill.meta, one_prefill.x) == "prefill"
    assert _auto_path(scattered.meta, scattered.x) == "dense"
    assert _auto_path(scattered_prefill.meta, scattered_prefill.x) == "dense"
    x = torch.randn(300, 32)
    for span, want in ((2, "dense"), (3, "prefill")):  # requests grouped by adapter, in runs
        slots = (torch.arange(300) * span // 300).to(torch.int32)[:, None]
        meta = build_dispatch(slots, torch.ones(300, 1), 8)
        assert _auto_path(meta, x) == want, span
