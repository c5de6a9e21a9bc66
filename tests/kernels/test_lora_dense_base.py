"""The base projection and its slot-dense LoRA in one launch (`lora_dense_base`) against a float64
oracle (x @ W.T + bias plus the pair-by-pair LoRA delta; interpreter on CPU, real shapes on GPU),
and the Triton backend's decode_kernel="dense_base" through `base_and_apply_shared` and the MoLoRA
layers.

Outputs start as NaN (the kernel writes them, never reads them), lora padding past each slot's
rank is NaN (as in test_lora_triton), so reading either fails loudly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.backends import TritonBackend  # noqa: E402
from kernels.lora_dense import MAX_TOKENS  # noqa: E402
from kernels.lora_dense_base import PIPELINE_STAGES, default_block_n, lora_dense_base, pipeline_stages  # noqa: E402
from kernels.meta import build_dispatch  # noqa: E402
from tests.kernels.helpers import (  # noqa: E402
    DTYPES, GPU_GROUP_CASES, Group, assert_close, capture_cuda_graph, group_case_id,
)
from tests.kernels.test_lora_dense import CASES  # noqa: E402


class BaseGroup(Group):
    """A Group with base weights [D_out_g, D_in] (views of one concatenated weight, as a
    MoLoRAGroup holds them) and biases."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gen = torch.Generator().manual_seed(7)
        d_in, dtype, device = self.x.shape[1], self.x.dtype, self.x.device
        self.weight = (torch.randn(sum(self.d_outs), d_in, generator=gen) * d_in**-0.5).to(dtype).to(device)
        self.bias = torch.randn(sum(self.d_outs), generator=gen).to(dtype).to(device)
        self.base_weights = list(self.weight.split(self.d_outs))
        self.base_biases = list(self.bias.split(self.d_outs))

    def empty_outs(self):
        out = torch.full((self.x.shape[0], sum(self.d_outs)), float("nan"), dtype=self.x.dtype, device=self.x.device)
        return out, list(out.split(self.d_outs, dim=1))

    def expected_base(self, bias: bool, x=None, slots=None, weights=None):
        """float64 x @ W.T (+ bias) + the LoRA delta of the step."""
        x = (self.x if x is None else x).double().cpu()
        base = x @ self.weight.double().cpu().T + (self.bias.double().cpu() if bias else 0.0)
        return base + self.expected(x, slots, weights) - self.out.double().cpu()


def check_base(group: BaseGroup, dtype, bias: bool = True, **blocks):
    out, outs = group.empty_outs()
    result = lora_dense_base(group.x, group.base_weights, group.base_biases if bias else None, group.lora_a, group.lora_b,
                             group.ranks, group.scales, group.meta, outs, **blocks)
    assert result == outs
    assert_close(out, group.expected_base(bias), dtype, "lora_dense_base")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=group_case_id)
def test_base_and_lora_match_the_oracle(case, dtype):
    """Decode steps of 1 to 64 tokens, 1 to 3 modules, one to three chunks of slots (the first
    chunk's shrink inside the base loop, the others in their own), with a bias and without."""
    group = BaseGroup(*case, dtype)
    check_base(group, dtype, bias=True)
    check_base(group, dtype, bias=False)


def nan_in_unwritten_partials(monkeypatch):
    """Make the split-K shrink's partial products NaN wherever it writes nothing (slot chunks
    with no live column, whose torch.empty contents are arbitrary): a kernel that reads them fails."""
    import kernels.lora_dense_base as base_module

    real = base_module.split_shrink

    def shrink(x, lora_a_group, ranks_group, meta, slot_range, split_k, blocks, launch):
        splits, partials = real(x, lora_a_group, ranks_group, meta, slot_range, split_k, blocks, launch)
        _, block_r, per_chunk, _ = blocks
        counts, ranks = meta.slot_counts.cpu(), ranks_group.cpu()
        lo, hi = slot_range
        for g in range(lora_a_group.shape[0]):
            for chunk in range(partials.shape[2]):
                slots = range(lo + chunk * per_chunk, min(lo + (chunk + 1) * per_chunk, hi))
                if not any(counts[s] > 0 and ranks[g, s] > 0 for s in slots):
                    partials[:, g, chunk] = float("nan")
        return splits, partials

    monkeypatch.setattr(base_module, "split_shrink", shrink)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=group_case_id)
def test_split_k_shrink_then_base_and_lora_match_the_oracle(case, split_k, dtype, monkeypatch):
    """The two-launch form: lora_dense's split-K shrink over uneven D_in ranges, then the base
    kernel summing the partials of every live slot chunk (and no other: unwritten ones are NaN)."""
    nan_in_unwritten_partials(monkeypatch)
    group = BaseGroup(*case, dtype)
    check_base(group, dtype, block_k=16, split_k=split_k)
    check_base(group, dtype, bias=False, split_k=split_k)


@pytest.mark.parametrize("blocks", [dict(block_k=16, block_n=16), dict(block_k=128, block_n=32, num_warps=8),
                                    dict(block_n=64, num_stages=2)], ids=["small-tiles", "wide-k", "wide-n"])
def test_given_tile_sizes_give_the_same_result(blocks):
    check_base(BaseGroup(5, 2, 5, 96, (40, 24, 72), 16, "with_none", torch.float32), torch.float32, **blocks)


def test_slots_no_pair_uses_are_not_read():
    group = BaseGroup(6, 2, 6, 64, (48, 32), 16, "uniform", torch.float32)
    group.slots[group.slots == 5] = 0  # slot 5: no pair
    group.meta = build_dispatch(group.slots, group.weights, 6)
    group.lora_a[:, 5] = float("nan")
    for b in group.lora_b:
        b[5] = float("nan")
    check_base(group, torch.float32)


def test_a_step_on_no_adapter_is_the_base_projection():
    group = BaseGroup(4, 2, 3, 32, (16, 8), 8, "uniform", torch.float32)
    group.slots[:] = -1
    group.meta = build_dispatch(group.slots, group.weights, 3)
    check_base(group, torch.float32)
    out, _ = group.empty_outs()
    lora_dense_base(group.x, group.base_weights, group.base_biases, group.lora_a, group.lora_b, group.ranks, group.scales,
                    group.meta, list(out.split(group.d_outs, dim=1)))
    assert_close(out, (group.x.double() @ group.weight.double().T + group.bias.double()), torch.float32)


def test_default_tiles_give_a_group_64_programs_where_they_can():
    assert default_block_n([2048, 1024, 1024]) == 64  # 64 tiles
    assert default_block_n([1024]) == 16  # 64 tiles of 16, not 16 of 64
    assert default_block_n([512]) == 16  # 32 tiles: as many as it can
    assert default_block_n([1536]) == 16 and default_block_n([2048]) == 32


def test_deeper_pipeline_only_where_it_fits_shared_memory():
    bf16_stage = (16 + 64 + 4 * 16) * 128 * 2  # 16 tokens, a 64-wide output tile, 4 slots of rank 16, 128-wide K
    hopper = 227 * 1024
    assert pipeline_stages(bf16_stage, hopper) == PIPELINE_STAGES
    assert pipeline_stages(2 * bf16_stage, hopper) is None  # fp32 tiles: Triton's default, as before
    assert pipeline_stages(bf16_stage, 99 * 1024) is None  # an L4 or RTX 4090
    assert pipeline_stages(bf16_stage, 0) is None  # a device that does not say


@pytest.mark.parametrize("num_modules", [1, 2, 3, 4, 5])
def test_backend_runs_groups_of_three_modules_in_one_launch_each(num_modules, monkeypatch):
    """decode_kernel="dense_base": `base_and_apply_shared` runs chunks of 3 modules through the
    kernel and returns [T, sum D_out]; other kernels, and prefill steps, leave the base to the
    caller (None), and its `apply_shared` runs the LoRA alone through the dense kernel."""
    import kernels.lora_dense_base as base_module

    group = BaseGroup(6, 2, 5, 64, [48, 32, 16, 40, 24][:num_modules], 16, "with_none", torch.float32)
    launches = []
    real = base_module.lora_dense_base
    monkeypatch.setattr(base_module, "lora_dense_base", lambda *a: launches.append(len(a[4])) or real(*a))
    backend = TritonBackend(decode_kernel="dense_base")
    sizes = group.d_outs
    args = (group.x, group.weight, group.bias, sizes, group.lora_a, group.lora_b, group.ranks, group.scales)
    y = backend.base_and_apply_shared(*args, group.meta)
    assert launches == {1: [1], 2: [2], 3: [3], 4: [3, 1], 5: [3, 2]}[num_modules]
    assert_close(y, group.expected_base(bias=True), torch.float32, "base_and_apply_shared")
    assert TritonBackend(decode_kernel="dense").base_and_apply_shared(*args, group.meta) is None
    prefill = BaseGroup(70, 1, 5, 64, sizes, 16, "uniform", torch.float32)
    assert not prefill.meta.is_decode
    assert backend.base_and_apply_shared(prefill.x, prefill.weight, prefill.bias, sizes, prefill.lora_a,
                                         prefill.lora_b, prefill.ranks, prefill.scales, prefill.meta) is None
    out, outs = group.outs()
    backend.apply_shared(group.x, group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    assert_close(out, group.expected(), torch.float32, "apply_shared with dense_base: the LoRA alone")
    assert len(launches) == len({1: [1], 2: [2], 3: [3], 4: [3, 1], 5: [3, 2]}[num_modules])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_auto_takes_it_for_16_bit_decode_steps_and_not_for_fp32_or_prefill(dtype, monkeypatch):
    """decode_kernel="auto" (the default): a 16-bit decode step's base and LoRA in one launch per
    group; an fp32 step, or a prefill step, leaves the base matmul to the caller (None)."""
    import kernels.lora_dense_base as base_module

    launches = []
    real = base_module.lora_dense_base
    monkeypatch.setattr(base_module, "lora_dense_base", lambda *a: launches.append(a[0].dtype) or real(*a))
    backend = TritonBackend()
    assert backend.decode_kernel == "auto"
    for group_dtype in (dtype, torch.float32):
        group = BaseGroup(6, 2, 5, 64, [48, 32, 16], 16, "with_none", group_dtype)
        args = (group.x, group.weight, group.bias, group.d_outs, group.lora_a, group.lora_b, group.ranks, group.scales)
        y = backend.base_and_apply_shared(*args, group.meta)
        if group_dtype == torch.float32:
            assert y is None
        else:
            assert_close(y, group.expected_base(bias=True), dtype, "auto base_and_apply_shared")
    prefill = BaseGroup(70, 1, 5, 64, [48, 32], 16, "uniform", dtype)
    assert backend.base_and_apply_shared(prefill.x, prefill.weight, prefill.bias, prefill.d_outs, prefill.lora_a,
                                         prefill.lora_b, prefill.ranks, prefill.scales, prefill.meta) is None
    assert launches == [dtype]


def test_bad_arguments_raise():
    group = BaseGroup(4, 2, 3, 32, (16, 8), 8, "uniform", torch.float32)
    _, outs = group.empty_outs()
    lora = (group.lora_a, group.lora_b, group.ranks, group.scales, group.meta, outs)
    with pytest.raises(ValueError, match="one weight"):
        lora_dense_base(group.x, group.base_weights[:1], None, *lora)
    with pytest.raises(ValueError, match=r"weight 1 must be \[D_out=8, D_in=32\]"):
        lora_dense_base(group.x, [group.base_weights[0], group.base_weights[0]], None, *lora)
    with pytest.raises(ValueError, match="contiguous rows"):
        lora_dense_base(group.x, [w.t().contiguous().t() for w in group.base_weights], None, *lora)
    with pytest.raises(ValueError, match=r"bias 0 must be contiguous \[D_out=16\]"):
        lora_dense_base(group.x, group.base_weights, [group.base_biases[1], group.base_biases[1]], *lora)
    with pytest.raises(ValueError, match="weight 0 is torch.bfloat16"):
        lora_dense_base(group.x, [w.bfloat16() for w in group.base_weights], None, *lora)
    long = BaseGroup(MAX_TOKENS + 1, 1, 3, 32, (16, 8), 8, "uniform", torch.float32)
    _, long_outs = long.empty_outs()
    with pytest.raises(ValueError, match="decode steps only"):
        lora_dense_base(long.x, long.base_weights, None, long.lora_a, long.lora_b, long.ranks, long.scales, long.meta,
                        long_outs)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        lora_dense_base(group.x, group.base_weights, None, *lora, block_n=24)
    with pytest.raises(ValueError, match="split_k must be 1 to 64"):
        lora_dense_base(group.x, group.base_weights, None, *lora, split_k=0)


# Real shapes on a GPU (skipped without CUDA by tests/conftest.py).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_GROUP_CASES, ids=group_case_id)
def test_base_and_lora_match_the_oracle_gpu(case, dtype):
    check_base(BaseGroup(*case, dtype, device="cuda"), dtype)


@pytest.mark.gpu
def test_cuda_graph_replays_new_routing_gpu():
    """Captured once (no host sync inside), replayed after the routing and x changed."""
    from kernels.meta import DispatchBuffers

    first = BaseGroup(16, 2, 8, 1024, (1024, 512, 512), 16, "uniform", torch.bfloat16, device="cuda", seed=1)
    second = BaseGroup(16, 2, 8, 1024, (1024, 512, 512), 16, "with_none", torch.bfloat16, device="cuda", seed=1)
    second.x = torch.randn_like(first.x)
    buffers = DispatchBuffers(16, 2, 8, device="cuda")
    meta = buffers.build(first.slots, first.weights)
    x = first.x.clone()
    out, outs = first.empty_outs()

    def step():
        lora_dense_base(x, first.base_weights, first.base_biases, first.lora_a, first.lora_b, first.ranks, first.scales, meta,
                        outs)

    graph = capture_cuda_graph(step)
    for inputs, name in ((first, "first"), (second, "new")):
        buffers.build(inputs.slots, inputs.weights)
        x.copy_(inputs.x)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = first.expected_base(True, inputs.x, inputs.slots, inputs.weights)
        assert_close(out, want, torch.bfloat16, f"replay with the {name} routing")
