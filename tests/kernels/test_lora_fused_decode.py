"""The fused decode kernel (shrink and expand in one launch, up to 3 modules sharing x) against a
float64 pair-by-pair oracle (interpreter on CPU, real shapes on GPU), and the Triton backend's
use of it against its separate shrink and expand kernels.

As in test_lora_triton: lora padding past each slot's rank is NaN and outputs start random, so a
kernel that reads padding, skips a pair or writes a row it does not own fails loudly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_fused_decode import lora_fused_decode  # noqa: E402
from kernels.meta import DispatchBuffers, DispatchMeta  # noqa: E402
from tests.kernels.helpers import (  # noqa: E402
    DTYPES, GPU_GROUP_CASES, Group, assert_close, check_group_graph_replay, group_case_id,
)


# (T, K, S, D_in, D_outs, R, routing)
CASES = [
    (1, 1, 4, 256, (256,), 16, "uniform"),
    (5, 2, 5, 64, (64, 32, 32), 16, "with_none"),  # q/k/v
    (16, 2, 8, 128, (384, 384), 8, "zipf"),  # gate/up; max rank below the 16-wide rank tile
    (7, 4, 6, 96, (40, 24, 72), 48, "empty_slots"),  # no dimension a power of two
    (32, 2, 4, 512, (128,), 64, "skewed"),
    (3, 3, 3, 48, (17,), 12, "one"),  # every choice on one slot
]


def check_fused(group: Group, dtype):
    out, outs = group.outs()
    assert lora_fused_decode(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs) == outs
    assert_close(out, group.expected(), dtype, "lora_fused_decode")
    untouched = (group.slots < 0).all(dim=1)
    assert torch.equal(out[untouched], group.out[untouched]), "rows without an adapter changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=group_case_id)
def test_fused_decode_matches_pair_by_pair_oracle(case, dtype):
    check_fused(Group(*case, dtype), dtype)


@pytest.mark.parametrize("num_modules", [1, 2, 3, 4, 5])
def test_backend_fuses_groups_of_two_or_three_and_equals_separate_kernels(num_modules, monkeypatch):
    """Chunks of 3 modules; a chunk of 2 or 3 takes one fused launch, a lone module the separate
    kernels (measured faster); either way the result is the separate kernels' and the oracle's."""
    group = Group(6, 2, 5, 64, [48, 32, 16, 40, 24][:num_modules], 16, "with_none", torch.float32)
    split_out, split_outs = group.outs()
    TritonBackend(decode_kernel="split").apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales,
                                                   group.meta, split_outs)
    import kernels.lora_fused_decode as fused_module

    launches = []
    real = fused_module.lora_fused_decode
    monkeypatch.setattr(fused_module, "lora_fused_decode", lambda *a: launches.append(len(a[2])) or real(*a))
    monkeypatch.setattr(DispatchMeta, "host_counts", lambda self: pytest.fail("the decode path read counts back"))
    out, outs = group.outs()
    TritonBackend().apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    assert launches == {1: [], 2: [2], 3: [3], 4: [3], 5: [3, 2]}[num_modules]
    assert_close(out, split_out, torch.float32, "fused vs separate shrink and expand")
    assert_close(out, group.expected(), torch.float32, "fused vs oracle")


def test_groups_whose_recomputed_reads_exceed_the_budget_run_split(monkeypatch):
    import kernels.lora_fused_decode as fused_module

    meta = DispatchBuffers(16, 2, 4).build(torch.zeros(16, 2, dtype=torch.int32), torch.ones(16, 2))
    a = lambda g, d_in: torch.empty(g, 4, 16, d_in, dtype=torch.bfloat16, device="meta")  # noqa: E731
    b = lambda d_out: torch.empty(4, d_out, 16, dtype=torch.bfloat16, device="meta")  # noqa: E731
    # Qwen3-0.6B q/k/v: 32 pairs x (4 + 2 + 2 tiles of 256 columns) x 16 x 1024 bf16 values.
    qkv = a(3, 1024), [b(1024), b(512), b(512)]
    assert fused_module.recompute_bytes(meta.num_pairs, *qkv) == 32 * 8 * 16 * 1024 * 2
    assert fused_module.use_fused(meta, *qkv)
    # 7B gate/up: 32 pairs x 112 tiles x 16 x 4096 values = 470 MB, measured slower fused.
    assert not fused_module.use_fused(meta, a(2, 4096), [b(14336), b(14336)])
    assert not fused_module.use_fused(meta, a(1, 1024), [b(1024)])  # a lone module
    monkeypatch.setattr(fused_module, "MAX_RECOMPUTE_BYTES", 32 * 8 * 16 * 1024 * 2 - 1)
    assert not fused_module.use_fused(meta, *qkv)
    # And the backend follows the budget on real tensors.
    group = Group(6, 2, 5, 64, (48, 32), 16, "with_none", torch.float32)
    monkeypatch.setattr(fused_module, "lora_fused_decode", lambda *a: pytest.fail("fused over the budget"))
    monkeypatch.setattr(fused_module, "MAX_RECOMPUTE_BYTES", 0)
    out, outs = group.outs()
    TritonBackend().apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    assert_close(out, group.expected(), torch.float32)


def test_prefill_steps_keep_the_grouped_kernels(monkeypatch):
    import kernels.lora_fused_decode as fused_module

    monkeypatch.setattr(fused_module, "lora_fused_decode", lambda *a: pytest.fail("fused kernel on a prefill step"))
    group = Group(40, 2, 5, 64, (32, 16), 16, "uniform", torch.float32)
    assert not group.meta.is_decode
    out, outs = group.outs()
    TritonBackend().apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    assert_close(out, group.expected(), torch.float32)


@pytest.mark.parametrize("blocks", [dict(block_k=16, block_n=16), dict(block_k=256, block_n=32, num_warps=8)],
                         ids=["small-tiles", "wide-k"])
def test_given_tile_sizes_give_the_same_result(blocks):
    group = Group(5, 2, 5, 96, (40, 24, 72), 16, "with_none", torch.float32)
    out, outs = group.outs()
    lora_fused_decode(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs, **blocks)
    assert_close(out, group.expected(), torch.float32)


def test_bad_arguments_raise():
    group = Group(4, 2, 3, 32, (16, 16, 16, 16), 8, "uniform", torch.float32)
    _, outs = group.outs()
    args = (group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta)
    with pytest.raises(ValueError, match="1 to 3 modules"):
        lora_fused_decode(*args, outs)
    three = (group.x, group.lora_a[:3], group.lora_b[:3], group.ranks[:3], group.scales[:3], group.meta)
    with pytest.raises(ValueError, match="as many outs"):
        lora_fused_decode(*three, outs[:2])
    with pytest.raises(ValueError, match="ranks_group must be"):
        lora_fused_decode(group.x, group.lora_a[:3], group.lora_b[:3], group.ranks[:2], group.scales[:3],
                          group.meta, outs[:3])
    with pytest.raises(ValueError, match="lora_a_group must be"):
        lora_fused_decode(group.x, group.lora_a[:2], group.lora_b[:3], group.ranks[:3], group.scales[:3],
                          group.meta, outs[:3])
    with pytest.raises(ValueError, match="out must be"):
        lora_fused_decode(*three, [outs[0], outs[1], outs[2][:2]])
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        lora_fused_decode(*three, outs[:3], block_k=48)
    with pytest.raises(ValueError, match="num_warps must be"):
        lora_fused_decode(*three, outs[:3], num_warps=3)


# Real shapes on a GPU (skipped without CUDA by tests/conftest.py).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_GROUP_CASES, ids=group_case_id)
def test_fused_decode_matches_oracle_gpu(case, dtype):
    check_fused(Group(*case, dtype, device="cuda"), dtype)


@pytest.mark.gpu
def test_fused_decode_cuda_graph_replays_new_routing_gpu():
    """Captured once, replayed after the routing (and x) changed: the kernel reads the dispatch
    buffers at their fixed addresses and syncs with nothing."""
    check_group_graph_replay(TritonBackend().apply_shared)
