"""The slot-dense decode kernel (every token through every used slot, up to 3 modules sharing x)
against a float64 pair-by-pair oracle (interpreter on CPU, real shapes on GPU), and the Triton
backend's decode_kernel choice.

As in test_lora_triton: lora padding past each slot's rank is NaN and outputs start random, so a
kernel that reads padding, skips a pair or writes a row it does not own fails loudly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_dense_decode import MAX_TOKENS, lora_dense_decode  # noqa: E402
from kernels.meta import DECODE_MAX_PAIRS, build_dispatch  # noqa: E402
from tests.kernels.helpers import (  # noqa: E402
    DTYPES, GPU_GROUP_CASES, Group, assert_close, check_group_graph_replay, group_case_id,
)

# (T, K, S, D_in, D_outs, R, routing)
CASES = [
    (1, 1, 4, 256, (256,), 16, "uniform"),
    (5, 2, 5, 64, (64, 32, 32), 16, "with_none"),  # q/k/v; 5 slots of rank 16 = two chunks of 4
    (16, 2, 8, 128, (384, 384), 8, "zipf"),  # gate/up; max rank below the 16-wide rank tile
    (7, 4, 6, 96, (40, 24, 72), 48, "empty_slots"),  # no dimension a power of two; one slot per chunk
    (32, 2, 4, 512, (128,), 64, "skewed"),
    (3, 3, 3, 48, (17,), 12, "one"),  # every choice on one slot
    (64, 1, 12, 80, (48, 16), 16, "uniform"),  # the most tokens a step may have; three chunks
]


def check_dense(group: Group, dtype, **blocks):
    out, outs = group.outs()
    result = lora_dense_decode(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs,
                               **blocks)
    assert result == outs
    assert_close(out, group.expected(), dtype, "lora_dense_decode")
    untouched = (group.slots < 0).all(dim=1)
    assert torch.equal(out[untouched], group.out[untouched]), "rows without an adapter changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=group_case_id)
def test_dense_decode_matches_pair_by_pair_oracle(case, dtype):
    check_dense(Group(*case, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=group_case_id)
def test_split_k_matches_the_oracle(case, split_k, dtype):
    """The two-launch form (split-K shrink into fp32 partials, then the expand summing them):
    D_in ranges of uneven length, several slot chunks, 1 to 3 modules."""
    check_dense(Group(*case, dtype), dtype, block_k=16, split_k=split_k)


def test_wide_inputs_split_the_shrink_by_default(monkeypatch):
    """split_k=None: D_in >= 1024 runs the split-K shrink launch (default_split_k ranges), narrower
    inputs one launch; both equal the oracle."""
    import kernels.lora_dense_decode as dense_module

    assert [dense_module.default_split_k(d) for d in (256, 1023, 1024, 3072, 4096, 14336)] == [1, 1, 4, 8, 8, 16]
    grids = []
    real = dense_module._lora_dense_shrink_kernel

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(dense_module, "_lora_dense_shrink_kernel", Recording())
    check_dense(Group(3, 2, 3, 1024, (32, 16), 8, "uniform", torch.float32), torch.float32)
    assert grids == [(4, 2, 1)]  # 4 ranges of D_in x 2 modules x 1 chunk of slots
    check_dense(Group(3, 2, 3, 512, (32,), 8, "uniform", torch.float32), torch.float32)
    assert len(grids) == 1


@pytest.mark.gpu
def test_split_k_results_do_not_vary_from_run_to_run_gpu():
    """The partials are summed in a fixed order (no atomics): identical bits on every run."""
    group = Group(16, 2, 8, 4096, (1024, 512), 16, "uniform", torch.bfloat16, device="cuda")
    results = []
    for _ in range(2):
        out, outs = group.outs()
        lora_dense_decode(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs,
                          split_k=8)
        results.append(out)
    assert torch.equal(results[0], results[1])


def test_slots_no_pair_uses_are_not_read():
    """An unused slot's weights may hold anything (a slot being loaded, say): NaN there must not
    reach the output, which it would through a multiply by a zero routing weight."""
    group = Group(6, 2, 6, 64, (48, 32), 16, "uniform", torch.float32)
    group.slots[group.slots == 5] = 0  # slot 5: no pair
    group.meta = build_dispatch(group.slots, group.weights, 6)
    unused = [5]
    for s in unused:
        group.lora_a[:, s] = float("nan")
        for b in group.lora_b:
            b[s] = float("nan")
    check_dense(group, torch.float32)


@pytest.mark.parametrize("blocks", [dict(block_k=16, block_n=16), dict(block_k=128, block_n=32, num_warps=8),
                                    dict(block_n=128, num_stages=2)], ids=["small-tiles", "wide-k", "wide-n"])
def test_given_tile_sizes_give_the_same_result(blocks):
    check_dense(Group(5, 2, 5, 96, (40, 24, 72), 16, "with_none", torch.float32), torch.float32, **blocks)


@pytest.mark.parametrize("num_modules", [1, 2, 3, 4, 5])
def test_backend_dense_decode_equals_separate_kernels(num_modules, monkeypatch):
    """decode_kernel="dense": chunks of 3 modules, one dense launch each (a lone module too),
    with the separate kernels' result and the oracle's."""
    group = Group(6, 2, 5, 64, [48, 32, 16, 40, 24][:num_modules], 16, "with_none", torch.float32)
    split_out, split_outs = group.outs()
    TritonBackend(decode_kernel="split").apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales,
                                                      group.meta, split_outs)
    import kernels.lora_dense_decode as dense_module

    launches = []
    real = dense_module.lora_dense_decode
    monkeypatch.setattr(dense_module, "lora_dense_decode", lambda *a: launches.append(len(a[2])) or real(*a))
    out, outs = group.outs()
    TritonBackend(decode_kernel="dense").apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales,
                                                      group.meta, outs)
    assert launches == {1: [1], 2: [2], 3: [3], 4: [3, 1], 5: [3, 2]}[num_modules]
    assert_close(out, split_out, torch.float32, "dense vs separate shrink and expand")
    assert_close(out, group.expected(), torch.float32, "dense vs oracle")


def test_every_decode_step_fits_the_kernel():
    """The default decode kernel takes every decode step: `is_decode` admits at most
    DECODE_MAX_PAIRS pairs, so at most that many tokens."""
    assert DECODE_MAX_PAIRS <= MAX_TOKENS
    assert TritonBackend().decode_kernel == "auto"


def test_16_bit_decode_steps_take_it_by_default_and_fp32_and_prefill_steps_do_not(monkeypatch):
    import kernels.lora_dense_decode as dense_module

    launches = []
    real = dense_module.lora_dense_decode
    monkeypatch.setattr(dense_module, "lora_dense_decode",
                        lambda *a: launches.append((a[5].num_tokens, a[0].dtype)) or real(*a))
    for dtype in (torch.float32, torch.bfloat16):
        prefill = Group(40, 2, 5, 64, (32, 16), 16, "uniform", dtype)
        assert not prefill.meta.is_decode
        decode = Group(6, 2, 5, 64, (32, 16), 16, "uniform", dtype)
        for group, backend in ((prefill, TritonBackend(decode_kernel="dense")), (prefill, TritonBackend()),
                               (decode, TritonBackend())):
            out, outs = group.outs()
            backend.apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
            assert_close(out, group.expected(), dtype)
    assert launches == [(6, torch.bfloat16)]


def test_bad_arguments_raise():
    group = Group(4, 2, 3, 32, (16, 16, 16, 16), 8, "uniform", torch.float32)
    _, outs = group.outs()
    three = (group.x, group.lora_a[:3], group.lora_b[:3], group.ranks[:3], group.scales[:3], group.meta)
    with pytest.raises(ValueError, match="1 to 3 modules"):
        lora_dense_decode(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    with pytest.raises(ValueError, match="scales_group must be"):
        lora_dense_decode(group.x, group.lora_a[:3], group.lora_b[:3], group.ranks[:3], group.scales[:2],
                          group.meta, outs[:3])
    with pytest.raises(ValueError, match="out must be"):
        lora_dense_decode(*three, [outs[0], outs[1], outs[2][:2]])
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        lora_dense_decode(*three, outs[:3], block_n=24)
    with pytest.raises(ValueError, match="num_stages must be"):
        lora_dense_decode(*three, outs[:3], num_stages=0)
    with pytest.raises(ValueError, match="split_k must be 1 to 64"):
        lora_dense_decode(*three, outs[:3], split_k=0)
    many = Group(MAX_TOKENS + 1, 1, 3, 32, (16,), 8, "uniform", torch.float32)
    _, many_outs = many.outs()
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens"):
        lora_dense_decode(many.x, many.lora_a, many.lora_b, many.ranks, many.scales, many.meta, many_outs)
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        TritonBackend(decode_kernel="fastest")


# Real shapes on a GPU (skipped without CUDA by tests/conftest.py).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_GROUP_CASES, ids=group_case_id)
def test_dense_decode_matches_oracle_gpu(case, dtype):
    check_dense(Group(*case, dtype, device="cuda"), dtype)


@pytest.mark.gpu
def test_dense_decode_cuda_graph_replays_new_routing_gpu():
    """Captured once, replayed after the routing (and x) changed: the kernel reads the routes and
    slot counts at their fixed addresses and syncs with nothing."""
    check_group_graph_replay(TritonBackend(decode_kernel="dense").apply_shared)
