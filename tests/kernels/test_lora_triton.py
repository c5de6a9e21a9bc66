"""Triton shrink / expand against the torch reference (interpreter on CPU, real shapes on GPU).

Inputs are random and non-zero, the lora padding past each slot's rank and the h entries the
expand must not read are NaN, and outputs start from random values, so a kernel that reads
padding, skips a pair, or writes a row it does not own fails loudly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.backends import get_backend  # noqa: E402
from kernels.lora_expand import lora_expand  # noqa: E402
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref  # noqa: E402
from kernels.lora_shrink import lora_shrink  # noqa: E402
from kernels.meta import DispatchBuffers, DispatchMeta, build_dispatch  # noqa: E402
from tests.kernels.helpers import DISTRIBUTIONS, DTYPES, Problem, assert_close, capture_cuda_graph, make_problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def poisoned_h(p: Problem) -> torch.Tensor:
    """Reference h with NaN wherever lora_expand must not look (past rank, slot -1 pairs)."""
    h = lora_shrink_ref(p.x, p.lora_a, p.ranks, p.meta)
    slots = p.meta.slots.long()
    rank = torch.where(slots >= 0, p.ranks[slots.clamp(min=0)], 0)
    cols = torch.arange(h.shape[1], device=h.device)
    return h.masked_fill(cols[None, :] >= rank[:, None], float("nan"))


def check_shrink(p: Problem, dtype, path="auto", block_m=None):
    expected = lora_shrink_ref(p.x, p.lora_a, p.ranks, p.meta)
    h = lora_shrink(p.x, p.lora_a, p.ranks, p.meta, block_m, path=path)
    assert h.dtype == torch.float32
    assert_close(h, expected, dtype, f"lora_shrink[{path}, block_m={block_m}]")
    zero = expected == 0  # past rank and slot -1 pairs: exactly zero
    assert torch.equal(h[zero], expected[zero])


def check_expand(p: Problem, dtype, path="auto", block_m=None):
    h = poisoned_h(p)
    expected = lora_expand_ref(h, p.lora_b, p.ranks, p.scales, p.meta, p.out.clone())
    out = p.out.clone()
    assert lora_expand(h, p.lora_b, p.ranks, p.scales, p.meta, out, block_m, path=path) is out
    assert_close(out, expected, dtype, f"lora_expand[{path}, block_m={block_m}]")
    untouched = (p.meta.slots.view(p.slots.shape) < 0).all(dim=1)
    assert torch.equal(out[untouched], p.out[untouched]), "rows without an adapter changed"


# (T, K, S, D_in, D_out, R, routing): large T with small D, large D with small T.
INTERP_CASES = [
    (1, 1, 4, 4096, 1024, 64, "uniform"),
    (1, 4, 8, 1024, 2048, 32, "uniform"),
    (16, 2, 8, 512, 256, 64, "zipf"),
    (64, 1, 6, 256, 128, 16, "with_none"),
    (33, 2, 6, 256, 384, 48, "skewed"),
    (300, 2, 12, 128, 96, 64, "empty_slots"),
    (1024, 4, 8, 64, 64, 32, "zipf"),
    (4096, 1, 8, 64, 64, 16, "with_none"),
]


def case_id(c):
    return "T{}K{}S{}D{}x{}R{}-{}".format(*c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INTERP_CASES, ids=case_id)
def test_triton_matches_ref(case, dtype):
    *shape, dist = case
    p = make_problem(*shape, dtype=dtype, dist=dist, seed=shape[0] + shape[3], device=DEVICE)
    check_shrink(p, dtype)
    check_expand(p, dtype)
    # The other path must be right too: grouped tiles on decode-sized steps, and the
    # per-pair kernels on small prefill steps.
    other = "prefill" if p.meta.is_decode else "decode"
    if other == "prefill" or p.meta.num_pairs <= 256:
        check_shrink(p, dtype, path=other)
        check_expand(p, dtype, path=other)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_routing_distributions(dist, top_k, dtype):
    p = make_problem(200 // top_k, top_k, 9, 64, 80, 64, dtype=dtype, dist=dist, seed=top_k, device=DEVICE)
    assert not p.meta.is_decode
    check_shrink(p, dtype)
    check_expand(p, dtype)
    small = make_problem(12 // top_k, top_k, 9, 64, 80, 64, dtype=dtype, dist=dist, seed=top_k, device=DEVICE)
    assert small.meta.is_decode
    check_shrink(small, dtype)
    check_expand(small, dtype)


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_triton_block_m_override(block_m):
    p = make_problem(150, 2, 5, 64, 64, 32, dtype=torch.float32, dist="zipf", seed=block_m, device=DEVICE)
    check_shrink(p, torch.float32, path="prefill", block_m=block_m)
    check_expand(p, torch.float32, path="prefill", block_m=block_m)


def test_given_block_m_reads_no_host_counts(monkeypatch):
    p = make_problem(100, 2, 5, 64, 64, 16, dtype=torch.float32, dist="uniform", device=DEVICE)
    expected_h = lora_shrink_ref(p.x, p.lora_a, p.ranks, p.meta)
    expected = lora_expand_ref(expected_h, p.lora_b, p.ranks, p.scales, p.meta, p.out.clone())
    meta = build_dispatch(p.slots, p.weights, 5)  # fresh: nothing cached on the host

    def no_sync(self):
        raise AssertionError("launcher synced with the host although block_m was given")

    monkeypatch.setattr(DispatchMeta, "host_counts", no_sync)
    h = lora_shrink(p.x, p.lora_a, p.ranks, meta, block_m=32)
    out = lora_expand(h, p.lora_b, p.ranks, p.scales, meta, p.out.clone(), block_m=32)
    assert_close(h, expected_h, torch.float32)
    assert_close(out, expected, torch.float32)


def test_rank_zero_and_no_adapter_pairs_write_nothing():
    p = make_problem(40, 2, 4, 64, 64, 16, dtype=torch.float32, dist="uniform", device=DEVICE)
    ranks = torch.zeros_like(p.ranks)
    for path in ("decode", "prefill"):
        h = lora_shrink(p.x, p.lora_a, ranks, p.meta, path=path)
        assert torch.equal(h, torch.zeros_like(h))
        meta = build_dispatch(torch.full_like(p.slots, -1), p.weights, 4)
        out = p.out.clone()
        lora_expand(torch.randn_like(h), p.lora_b, p.ranks, p.scales, meta, out, path=path)
        assert torch.equal(out, p.out)


def test_dispatch_buffers_meta_and_backend_apply():
    """The path layers take: DispatchBuffers metadata, then TritonBackend.apply vs TorchBackend."""
    triton_backend, torch_backend = get_backend("triton"), get_backend("torch")
    buffers = DispatchBuffers(max_tokens=256, max_k=2, num_slots=6, device=DEVICE)
    for num_tokens, dist in [(3, "with_none"), (200, "zipf")]:
        p = make_problem(num_tokens, 2, 6, 64, 96, 32, torch.bfloat16, dist, device=DEVICE, pad_value=0.0)
        meta = buffers.build(p.slots, p.weights)
        args = (p.x, p.lora_a, p.lora_b, p.ranks, p.scales, meta)
        expected = torch_backend.apply(*args, p.out.clone())
        assert_close(triton_backend.apply(*args, p.out.clone()), expected, torch.bfloat16)


def test_backend_apply_hands_the_expand_an_unfilled_h(monkeypatch):
    """TritonBackend.apply skips the shrink's zero-fill on the prefill path: h comes from
    torch.empty (poisoned with NaN here) and the expand reads only what the shrink wrote, so the
    result still equals the torch backend's (which reads the lora padding: zero here); the written
    entries equal the reference h."""
    import kernels.lora_shrink as shrink_module

    class NaNEmpty:
        calls = 0

        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *shape, **kwargs):
            NaNEmpty.calls += 1
            return torch.full(shape, float("nan"), **kwargs)

    monkeypatch.setattr(shrink_module, "torch", NaNEmpty())
    p = make_problem(90, 2, 6, 64, 96, 32, torch.float32, "with_none", device=DEVICE, pad_value=0.0)
    args = (p.x, p.lora_a, p.lora_b, p.ranks, p.scales, p.meta)
    got = get_backend("triton").apply(*args, p.out.clone())
    assert NaNEmpty.calls == 1
    assert_close(got, get_backend("torch").apply(*args, p.out.clone()), torch.float32)
    h = lora_shrink(p.x, p.lora_a, p.ranks, p.meta, zero_fill=False)
    written = ~poisoned_h(p).isnan()
    assert_close(h[written], lora_shrink_ref(p.x, p.lora_a, p.ranks, p.meta)[written], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens", [5, 90], ids=["decode", "prefill"])
def test_apply_shared_into_column_slices_with_fixed_block_m(num_tokens, dtype, monkeypatch):
    """What a MoLoRAGroup runs on CUDA: q/k/v deltas written into column slices of one output,
    with meta.block_m set as inside a captured graph (so no host read of the slot counts)."""
    d_outs = (64, 32, 32)
    problems = [make_problem(num_tokens, 2, 5, 64, d, 16, dtype, "with_none", seed=3, device=DEVICE, pad_value=0.0)
                for d in d_outs]
    p0 = problems[0]
    lora_a_group = torch.stack([p.lora_a for p in problems])
    lora_b_list = [p.lora_b for p in problems]
    ranks = torch.stack([p.ranks for p in problems])
    scales = torch.stack([p.scales for p in problems])
    out = torch.randn(num_tokens, sum(d_outs), device=DEVICE).to(dtype)
    expected = [o.clone() for o in out.split(d_outs, dim=1)]
    get_backend("torch").apply_shared(p0.x, lora_a_group, lora_b_list, ranks, scales, p0.meta, expected)
    meta = build_dispatch(p0.slots, p0.weights, 5)
    meta.block_m = 16
    monkeypatch.setattr(DispatchMeta, "host_counts", lambda self: pytest.fail("host read inside a graph step"))
    got = list(out.clone().split(d_outs, dim=1))
    get_backend("triton").apply_shared(p0.x, lora_a_group, lora_b_list, ranks, scales, meta, got)
    for g, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, dtype, f"module {g}")


def test_bad_arguments_raise():
    p = make_problem(8, 2, 3, 64, 32, 16, dtype=torch.float32, dist="uniform", device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(p.x.half(), p.lora_a, p.ranks, p.meta)
    with pytest.raises(ValueError, match="slot_ranks"):
        lora_shrink(p.x, p.lora_a, p.ranks.long(), p.meta)
    with pytest.raises(ValueError, match="contiguous"):
        lora_shrink(p.x, p.lora_a.transpose(1, 2).contiguous().transpose(1, 2), p.ranks, p.meta)
    with pytest.raises(ValueError, match="D_in"):
        lora_shrink(p.x[:, :32], p.lora_a, p.ranks, p.meta)
    with pytest.raises(ValueError, match="block_m"):
        lora_shrink(p.x, p.lora_a, p.ranks, p.meta, block_m=48, path="prefill")
    with pytest.raises(ValueError, match="path"):
        lora_shrink(p.x, p.lora_a, p.ranks, p.meta, path="fast")
    h = lora_shrink(p.x, p.lora_a, p.ranks, p.meta)
    with pytest.raises(ValueError, match="slot_scales"):
        lora_expand(h, p.lora_b, p.ranks, p.scales.double(), p.meta, p.out)
    with pytest.raises(ValueError, match="out must be"):
        lora_expand(h, p.lora_b, p.ranks, p.scales, p.meta, p.out[:4])
    with pytest.raises(ValueError, match="h must be"):
        lora_expand(h.half(), p.lora_b, p.ranks, p.scales, p.meta, p.out)


# Real shapes on a GPU (skipped without CUDA by tests/conftest.py).
GPU_CASES = [
    (1, 1, 16, 4096, 4096, 64, "uniform"),
    (8, 2, 16, 4096, 4096, 64, "with_none"),
    (64, 1, 16, 4096, 14336, 16, "zipf"),
    (512, 2, 32, 4096, 4096, 64, "skewed"),
    (2048, 1, 64, 4096, 1024, 64, "empty_slots"),
    (4096, 2, 16, 4096, 4096, 64, "zipf"),
    (4096, 4, 8, 2048, 6144, 32, "one"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_triton_matches_ref_gpu(case, dtype):
    *shape, dist = case
    p = make_problem(*shape, dtype=dtype, dist=dist, seed=7, device="cuda")
    check_shrink(p, dtype)
    check_expand(p, dtype)
    check_shrink(p, dtype, path="prefill", block_m=64)
    check_expand(p, dtype, path="prefill", block_m=64)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [8, 512])
def test_cuda_graph_replay_matches_eager_gpu(num_tokens):
    """Captured with fixed block_m (no host sync), replayed after the routing changed."""
    top_k, num_slots, d, rank = 2, 16, 1024, 64
    buffers = DispatchBuffers(num_tokens, top_k, num_slots, device="cuda")
    shape = (num_tokens, top_k, num_slots, d, d, rank, torch.bfloat16)
    first = make_problem(*shape, "uniform", seed=1, device="cuda", pad_value=0.0)
    second = make_problem(*shape, "zipf", seed=2, device="cuda", pad_value=0.0)
    # Same hot-set, new tokens and routing.
    second.lora_a, second.lora_b, second.ranks, second.scales = first.lora_a, first.lora_b, first.ranks, first.scales
    meta = buffers.build(first.slots, first.weights)
    x, out = first.x.clone(), first.out.clone()

    def step():
        h = lora_shrink(x, first.lora_a, first.ranks, meta, block_m=64)
        return lora_expand(h, first.lora_b, first.ranks, first.scales, meta, out, block_m=64)

    graph = capture_cuda_graph(step)

    for p in (first, second):
        eager_meta = build_dispatch(p.slots, p.weights, num_slots)
        h = lora_shrink_ref(p.x, p.lora_a, p.ranks, eager_meta)
        expected = lora_expand_ref(h, p.lora_b, p.ranks, p.scales, eager_meta, p.out.clone())
        buffers.build(p.slots, p.weights)
        x.copy_(p.x)
        out.copy_(p.out)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, expected, torch.bfloat16)
