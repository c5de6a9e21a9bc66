"""The slot-dense kernel (every token through every used slot, up to 3 modules sharing x) against a
float64 pair-by-pair oracle (interpreter on CPU, real shapes on GPU), at decode sizes (one tile of
tokens) and prefill sizes (token tiles, a slot range), and the Triton backend's decode_kernel and
prefill_kernel choices.

As in test_lora_triton: lora padding past each slot's rank is NaN and outputs start random, so a
kernel that reads padding, skips a pair or writes a row it does not own fails loudly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_dense import MAX_TOKENS, PREFILL_BLOCK_T, lora_dense  # noqa: E402
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
    (64, 1, 12, 80, (48, 16), 16, "uniform"),  # the most tokens of one tile; three chunks
]
# Longer (prefill) steps: token tiles of PREFILL_BLOCK_T rows, the last one partial.
PREFILL_CASES = [
    (65, 1, 4, 64, (48,), 16, "uniform"),  # one token past the first tile
    (200, 2, 5, 96, (40, 24, 72), 16, "with_none"),  # q/k/v; two chunks of slots
    (150, 2, 8, 128, (64, 64), 8, "zipf"),
    (129, 3, 6, 48, (17,), 48, "skewed"),  # one slot per chunk
]


def used_span(group: Group) -> tuple[int, int]:
    used = [slot for slot, count in enumerate(group.meta.host_counts()) if count]
    return used[0], used[-1] + 1


def check_dense(group: Group, dtype, **blocks):
    out, outs = group.outs()
    result = lora_dense(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs,
                               **blocks)
    assert result == outs
    assert_close(out, group.expected(), dtype, "lora_dense")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=group_case_id)
def test_token_tiles_match_the_oracle(case, dtype):
    """Steps longer than one tile: the shrink launch writes h per token tile, the expand reads
    its tile's; with all S slots in range and with the used slots' range only."""
    group = Group(*case, dtype)
    assert group.meta.num_tokens > MAX_TOKENS
    check_dense(group, dtype)
    check_dense(group, dtype, slot_range=used_span(group))


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=group_case_id)
def test_one_tile_steps_over_the_used_slot_range_match_the_oracle(case):
    group = Group(*case, torch.float32)
    check_dense(group, torch.float32, slot_range=used_span(group))
    check_dense(group, torch.float32, slot_range=used_span(group), split_k=2)


@pytest.mark.parametrize("split_k", [1, 3])
def test_token_tiles_with_split_k_and_small_tiles_match_the_oracle(split_k):
    check_dense(Group(*PREFILL_CASES[1], torch.float32), torch.float32, split_k=split_k, block_k=16, block_n=16)


def test_prefill_steps_take_two_launches_over_token_tiles_and_the_slot_range(monkeypatch):
    """A 200-token step: shrink grid (token tiles, G, chunks of the range), expand grid (output
    tiles, token tiles); slots outside the range are neither read nor given h columns."""
    import kernels.lora_dense as dense_module

    grids = {}
    for name in ("_lora_dense_shrink_kernel", "_lora_dense_kernel"):
        real = getattr(dense_module, name)

        class Recording:
            def __getitem__(self, grid, name=name, real=real):
                grids[name] = grid
                return real[grid]

        monkeypatch.setattr(dense_module, name, Recording())
    group = Group(200, 2, 8, 64, (48, 32), 16, "uniform", torch.float32)
    group.slots = group.slots % 3 + 4  # slots 4, 5 and 6 only
    group.meta = build_dispatch(group.slots, group.weights, 8)
    for s in (0, 1, 2, 3, 7):
        group.lora_a[:, s] = float("nan")
        for b in group.lora_b:
            b[s] = float("nan")
    check_dense(group, torch.float32, slot_range=(4, 7))
    tiles = -(-200 // PREFILL_BLOCK_T)
    assert grids["_lora_dense_shrink_kernel"] == (tiles, 2, 1)  # 3 slots of rank 16: one chunk
    assert grids["_lora_dense_kernel"] == (1 + 1, tiles)  # 48 and 32 columns: one 64-wide tile each


def test_wide_inputs_split_the_shrink_by_default(monkeypatch):
    """split_k=None: D_in >= 1024 runs the split-K shrink launch (default_split_k ranges), narrower
    inputs one launch; both equal the oracle."""
    import kernels.lora_dense as dense_module

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
        lora_dense(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs,
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
    import kernels.lora_dense as dense_module

    launches = []
    real = dense_module.lora_dense
    monkeypatch.setattr(dense_module, "lora_dense", lambda *a: launches.append(len(a[2])) or real(*a))
    out, outs = group.outs()
    TritonBackend(decode_kernel="dense").apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales,
                                                      group.meta, outs)
    assert launches == {1: [1], 2: [2], 3: [3], 4: [3, 1], 5: [3, 2]}[num_modules]
    assert_close(out, split_out, torch.float32, "dense vs separate shrink and expand")
    assert_close(out, group.expected(), torch.float32, "dense vs oracle")


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_modules", [1, 3, 5])
def test_backend_dense_prefill_runs_steps_whose_slots_span_at_most_twice_top_k(num_modules, top_k, monkeypatch):
    """prefill_kernel "auto" (the default) and "dense": a prefill step on 4 adjacent slots (2 x
    top-2, or twice 2 x top-1) runs chunks of 3 modules through the dense kernel over those
    slots when they span at most DENSE_PREFILL_WASTE x top-k, and the grouped kernels otherwise;
    "grouped" always runs the grouped kernels. Every result equals the oracle."""
    import kernels.lora_dense as dense_module

    launches = []
    real = dense_module.lora_dense
    monkeypatch.setattr(dense_module, "lora_dense",
                        lambda *a, **k: launches.append((len(a[2]), k.get("slot_range"))) or real(*a, **k))
    group = Group(100, top_k, 8, 64, [48, 32, 16, 40, 24][:num_modules], 16, "uniform", torch.float32)
    group.slots = torch.where(group.slots >= 0, group.slots % 4 + 3, group.slots)  # slots 3 to 6
    group.meta = build_dispatch(group.slots, group.weights, 8)
    assert not group.meta.is_decode
    chunks = {1: [1], 3: [3], 5: [3, 2]}[num_modules]
    for kernel in ("dense", "auto", "grouped"):
        launches.clear()
        out, outs = group.outs()
        TritonBackend(prefill_kernel=kernel).apply_shared(group.x, group.lora_a, group.lora_b, group.ranks,
                                                          group.scales, group.meta, outs)
        assert_close(out, group.expected(), torch.float32, f"prefill_kernel={kernel}")
        assert launches == ([(n, (3, 7)) for n in chunks] if top_k == 2 and kernel != "grouped" else []), kernel


def test_every_decode_step_fits_the_kernel():
    """The default decode kernel takes every decode step: `is_decode` admits at most
    DECODE_MAX_PAIRS pairs, so at most that many tokens."""
    assert DECODE_MAX_PAIRS <= MAX_TOKENS
    assert TritonBackend().decode_kernel == "auto"


def test_16_bit_decode_steps_take_it_by_default_and_fp32_and_prefill_steps_do_not(monkeypatch):
    import kernels.lora_dense as dense_module

    launches = []
    real = dense_module.lora_dense
    monkeypatch.setattr(dense_module, "lora_dense",
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
        lora_dense(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    with pytest.raises(ValueError, match="scales_group must be"):
        lora_dense(group.x, group.lora_a[:3], group.lora_b[:3], group.ranks[:3], group.scales[:2],
                          group.meta, outs[:3])
    with pytest.raises(ValueError, match="out must be"):
        lora_dense(*three, [outs[0], outs[1], outs[2][:2]])
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        lora_dense(*three, outs[:3], block_n=24)
    with pytest.raises(ValueError, match="num_stages must be"):
        lora_dense(*three, outs[:3], num_stages=0)
    with pytest.raises(ValueError, match="split_k must be 1 to 64"):
        lora_dense(*three, outs[:3], split_k=0)
    for bad in ((2, 1), (-1, 2), (0, 4)):
        with pytest.raises(ValueError, match="slot_range must satisfy"):
            lora_dense(*three, outs[:3], slot_range=bad)
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        TritonBackend(decode_kernel="fastest")
    with pytest.raises(ValueError, match="prefill_kernel must be one of"):
        TritonBackend(prefill_kernel="fastest")


# Real shapes on a GPU (skipped without CUDA by tests/conftest.py).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_GROUP_CASES, ids=group_case_id)
def test_dense_decode_matches_oracle_gpu(case, dtype):
    check_dense(Group(*case, dtype, device="cuda"), dtype)


GPU_PREFILL_CASES = [
    (1000, 2, 8, 1024, (2048, 1024, 1024), 16, "with_none"),  # Qwen3-0.6B q/k/v
    (777, 1, 4, 3072, (1024,), 16, "zipf"),  # its down; the last token tile partial
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_PREFILL_CASES, ids=group_case_id)
def test_dense_prefill_matches_oracle_gpu(case, dtype):
    group = Group(*case, dtype, device="cuda")
    check_dense(group, dtype)
    check_dense(group, dtype, slot_range=used_span(group))


@pytest.mark.gpu
def test_dense_decode_cuda_graph_replays_new_routing_gpu():
    """Captured once, replayed after the routing (and x) changed: the kernel reads the routes and
    slot counts at their fixed addresses and syncs with nothing."""
    check_group_graph_replay(TritonBackend(decode_kernel="dense").apply_shared)
