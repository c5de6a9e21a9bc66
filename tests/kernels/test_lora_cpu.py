"""The CPU backend's compiled decode kernel against the torch twins (kernels.lora_ref), and the
backend's choice between them."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from kernels import build_dispatch, cpu_ext, get_backend, lora_cpu
from kernels.lora_ref import lora_apply_shared_ref

# Where a C++ compiler exists the kernel must build: a broken build fails here, not silently.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def test_the_kernel_builds_with_the_vector_width_this_cpu_has():
    assert lora_cpu.available()
    assert cpu_ext.module().lanes == (16 if "avx512f" in cpu_ext.cpu_flags() else 8)


@pytest.fixture(scope="module", params=["this_cpus", "other"], ids=["lanes-this-cpus", "lanes-other"])
def lanes(request):
    """The kernel at the vector width this CPU picks, then at the other one (a build of the LoRA
    kernel alone, `cpu_ext.build(lanes)`): a change that breaks the 16-lane code fails on an AVX2
    machine too, and the 8-lane code on an AVX-512 one."""
    native = cpu_ext.module().lanes
    if request.param == "this_cpus":
        yield native
        return
    other_lanes = 8 if native == 16 else 16
    other = cpu_ext.build(other_lanes)
    assert other.lanes == other_lanes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_ext, "module", lambda: other)
        yield other.lanes


def _routes(kind: str, tokens: int, top_k: int, slots: int, gen: torch.Generator):
    if kind == "one_adapter":
        s = torch.full((tokens, top_k), 1, dtype=torch.int32)
    elif kind == "per_request":  # contiguous runs, one slot each (the engine's grouped order)
        s = (torch.arange(tokens, dtype=torch.int32) * slots // tokens).view(-1, 1).repeat(1, top_k)
    else:  # per token: distinct slots per token, some tokens on no adapter, slot 0 left empty
        s = torch.stack([torch.randperm(slots - 1, generator=gen)[:top_k] + 1 for _ in range(tokens)]).int()
        s[::5, -1] = -1
    w = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1)
    return s, w


def _operands(dtype, tokens: int, d_in: int, sizes: list[int], slots: int, max_rank: int, gen: torch.Generator):
    """x [T, D_in], lora_a [G, S, R, D_in] and lora_b in the torch backends' layout (stored [S, R,
    D_out], handed over as [S, D_out, R] views), and the base output y [T, sum D_out]."""
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    lora_a = (torch.randn(len(sizes), slots, max_rank, d_in, generator=gen) / d_in**0.5).to(dtype)
    lora_b = [(torch.randn(slots, max_rank, n, generator=gen) / 4).to(dtype).transpose(1, 2) for n in sizes]
    return x, lora_a, lora_b, torch.randn(tokens, sum(sizes), generator=gen).to(dtype)


def _kernel_and_twin(x, lora_a, lora_b, ranks, scales, meta, y, sizes):
    """y plus the kernel's delta, and y plus the float64 twin's."""
    want = y.double()
    lora_apply_shared_ref(x.double(), lora_a.double(), [b.double() for b in lora_b], ranks, scales, meta,
                          list(want.split(sizes, 1)))
    got = y.clone()
    lora_cpu.lora_cpu_shared(x, lora_a, lora_b, ranks, scales, meta, list(got.split(sizes, 1)))
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["one_adapter", "per_request", "per_token"])
@pytest.mark.parametrize("tokens,top_k,d_in,sizes", [
    (1, 1, 16, [8]),
    (5, 2, 64, [48, 16, 16]),
    (16, 1, 256, [256, 128, 128]),
    (16, 2, 1024, [3072, 3072]),
    (40, 2, 200, [70]),  # column counts that are not multiples of the kernel's 64-column expand tasks
    (301, 2, 96, [80, 40]),  # a prefill-size step (602 pairs), and a token count that is not a multiple of 4
])
def test_kernel_equals_the_torch_twin(lanes, dtype, kind, tokens, top_k, d_in, sizes):
    gen = torch.Generator().manual_seed(tokens * 7 + d_in)
    groups, slots = len(sizes), 4
    x, lora_a, lora_b, y = _operands(dtype, tokens, d_in, sizes, slots, 16, gen)
    ranks = torch.tensor([[16, 8, 0, 4]] * groups, dtype=torch.int32)  # mixed ranks, one empty slot
    ranks[-1, 1] = 12
    scales = torch.tensor([[2.0, 0.5, 1.0, 1.5]] * groups)
    s, w = _routes(kind, tokens, top_k, slots, gen)
    meta = build_dispatch(s, w, slots)
    got, want = _kernel_and_twin(x, lora_a, lora_b, ranks, scales, meta, y, sizes)
    assert (got.double() - want).abs().max().item() <= TOL[dtype] * max(want.abs().max().item(), 1.0)
    # Padding past a slot's rank is never read, whatever it holds.
    padded_a, padded_b = lora_a.clone(), [b.clone() for b in lora_b]
    padded_a[:, 1, 8:] = float("nan")
    for b in padded_b:
        b[1, :, 8:] = float("nan")
    padded_a[-1, 1, 8:12], padded_b[-1][1, :, 8:12] = lora_a[-1, 1, 8:12], lora_b[-1][1, :, 8:12]
    again = y.clone()
    lora_cpu.lora_cpu_shared(x, padded_a, [b.transpose(1, 2).contiguous().transpose(1, 2) for b in padded_b],
                             ranks, scales, meta, list(again.split(sizes, 1)))
    assert torch.equal(again, got)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_size_of_a_slots_pairs(lanes, dtype):
    """A slot's pairs go in blocks of up to four (shrink) and eight (expand), the last block
    holding what is left: 1 to 19 pairs on one slot cover every size of last block, next to a
    slot with one pair, against the float64 twin."""
    gen = torch.Generator().manual_seed(11)
    sizes = [96, 40]
    for tokens in range(1, 20):
        x, lora_a, lora_b, y = _operands(dtype, tokens + 1, 64, sizes, 3, 16, gen)
        ranks, scales = torch.full((2, 3), 16, dtype=torch.int32), torch.rand(2, 3, generator=gen) + 0.5
        s = torch.full((tokens + 1, 1), 2, dtype=torch.int32)
        s[tokens // 2] = 0  # one token on another slot, inside the run
        w = torch.rand(tokens + 1, 1, generator=gen) + 0.5
        got, want = _kernel_and_twin(x, lora_a, lora_b, ranks, scales, build_dispatch(s, w, 3), y, sizes)
        assert (got.double() - want).abs().max().item() <= TOL[dtype] * max(want.abs().max().item(), 1.0), tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_outputs_are_rounded_once_from_fp32_sums(lanes, dtype):
    """A 16-bit output element gets its pairs' deltas summed in fp32 and is rounded once, to
    nearest: within half a unit in the last place of the float64 result, element by element. The fp32 sums live in
    per-thread scratch that calls reuse without clearing: calls of other shapes run in between,
    and a slot that one module of the group leaves out (rank 0) holds some tokens' first pair."""
    gen = torch.Generator().manual_seed(5)
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    for tokens, top_k, sizes in [(600, 2, [96, 40]), (16, 2, [96, 40]), (9, 3, [150, 20]), (300, 1, [96, 40])]:
        x, lora_a, lora_b, y = _operands(dtype, tokens, 64, sizes, 4, 16, gen)
        ranks = torch.tensor([[0, 16, 16, 8], [16, 16, 4, 16]], dtype=torch.int32)
        scales = torch.rand(2, 4, generator=gen) + 0.5
        s = torch.stack([torch.randperm(4, generator=gen)[:top_k] for _ in range(tokens)]).int()
        s[::3, 0] = 0  # slot 0: the first in the expand's order, empty in module 0
        s[::7, -1] = -1
        w = torch.rand(tokens, top_k, generator=gen) + 0.25
        got, want = _kernel_and_twin(x, lora_a, lora_b, ranks, scales, build_dispatch(s, w, 4), y, sizes)
        exponent = torch.floor(torch.log2(want.abs().clamp_min(torch.finfo(dtype).smallest_normal)))
        # half a unit in the last place, plus fp32's own error where y and the deltas cancel
        tol = torch.exp2(exponent - bits - 1) + 2**-17 * (y.double().abs() + (want - y.double()).abs())
        assert ((got.double() - want).abs() <= tol).all(), (tokens, ((got.double() - want).abs() / tol).max())


def test_refuses_operands_it_does_not_take():
    meta = build_dispatch(torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1), 2)
    x, a = torch.randn(2, 8), torch.randn(1, 2, 4, 8)
    b_bad = [torch.randn(2, 6, 4)]  # stored [S, D_out, R]: not the rank-major layout
    with pytest.raises(ValueError, match="lora_b stored"):
        lora_cpu.lora_cpu_shared(x, a, b_bad, torch.ones(1, 2, dtype=torch.int32), torch.ones(1, 2), meta,
                                 [torch.zeros(2, 6)])
    b = [torch.randn(2, 4, 6).transpose(1, 2)]
    with pytest.raises(ValueError, match="T \\* K pairs"):
        lora_cpu.lora_cpu_shared(torch.randn(3, 8), a, b, torch.ones(1, 2, dtype=torch.int32), torch.ones(1, 2),
                                 meta, [torch.zeros(3, 6)])


@pytest.mark.parametrize("dtype,native_bf16", [(torch.float32, True), (torch.bfloat16, True),
                                               (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp32", "bf16-native", "bf16-converted", "fp16"])
def test_backend_runs_the_kernel_where_it_measured_faster(monkeypatch, dtype, native_bf16):
    """`lora_cpu.takes`: fp32 steps of up to MAX_PAIRS pairs; bf16 calls of up to MAX_MACS_BF16
    multiply-adds on a CPU with bf16 dot products, of any size elsewhere; fp16 calls of any size.
    The twins run the rest, and autograd."""
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"} if native_bf16 else {"avx2"}))
    backend = get_backend("cpu")
    calls = []
    monkeypatch.setattr(lora_cpu, "run_prepared", lambda x, prepared, routes, outs, top_k: calls.append(x.shape[0]))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 2, 16, 512, generator=gen).to(dtype)
    b = [torch.randn(2, 16, 512, generator=gen).to(dtype).transpose(1, 2)]
    ranks, scales = torch.full((1, 2), 16, dtype=torch.int32), torch.ones(1, 2)
    macs_per_pair = 16 * (512 + 512)
    assert lora_cpu.Prepared.make(a, b, ranks, scales).macs_per_pair == macs_per_pair
    bf16_limit = lora_cpu.MAX_MACS_BF16 // macs_per_pair
    limit = {torch.float32: lora_cpu.MAX_PAIRS, torch.bfloat16: bf16_limit if native_bf16 else None,
             torch.float16: None}[dtype]
    beyond = max(lora_cpu.MAX_PAIRS, bf16_limit) + 1
    # a decode-size step, a prefill at the limit, then one past it (no limit: past both others)
    sizes = (4, limit, limit + 1) if limit else (4, beyond)
    for tokens in sizes:
        meta = build_dispatch(torch.zeros(tokens, 1, dtype=torch.int32), torch.ones(tokens, 1), 2)
        out = torch.zeros(tokens, 512, dtype=dtype)
        backend.apply_shared(torch.randn(tokens, 512, generator=gen).to(dtype), a, b, ranks, scales, meta, [out])
        assert (out.abs().sum().item() == 0) == (tokens in calls)
    assert calls == ([4, limit] if limit else [4, beyond])
    # Autograd (router training) takes the twins too.
    w = torch.ones(4, 1, requires_grad=True)
    meta = build_dispatch(torch.zeros(4, 1, dtype=torch.int32), w, 2)
    backend.apply_shared(torch.randn(4, 512, generator=gen).to(dtype), a, b, ranks, scales, meta,
                         [torch.zeros(4, 512, dtype=dtype)])
    assert len(calls) == len(sizes) - (limit is not None)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64", reason="Linux x86-64 only")
def test_cpu_flags_are_this_cpus_instruction_sets():
    """The bf16 choice above reads /proc/cpuinfo's flag names, as ATen's CPU capability sees them."""
    flags = cpu_ext.cpu_flags()
    assert {"sse2", "fpu"} <= flags and not any(":" in f for f in flags)
    capability = torch.backends.cpu.get_cpu_capability()
    assert "avx2" in flags or capability not in ("AVX2", "AVX512")
    assert "avx512bw" in flags or capability != "AVX512"
    assert cpu_ext.native_dots(torch.bfloat16) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_ext.native_dots(torch.float32)


@pytest.mark.parametrize("pairs,slots", [(1, 1), (32, 4), (600, 8), (64, 3)])
def test_dispatch_sort_matches_the_torch_ops(pairs, slots):
    """build_dispatch's compiled sort on CPU against its device-op form (what CUDA runs)."""
    from kernels.meta import _dispatch_sort

    gen = torch.Generator().manual_seed(pairs)
    flat = torch.randint(-1, slots, (pairs,), generator=gen, dtype=torch.int32)
    got = [torch.empty(pairs, dtype=torch.int32), torch.empty(slots, dtype=torch.int32),
           torch.empty(slots + 1, dtype=torch.int32)]
    want = [torch.empty_like(t) for t in got]
    cpu_ext.module().dispatch_sort(flat, *got)
    _dispatch_sort(flat, slots, *want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_ext.module().dispatch_sort(torch.full((pairs,), slots, dtype=torch.int32), *got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,top_k,d_in,sizes,max_rank,ranks", [
    (6, 3, 37, [19, 5, 33], 13, [13, 5, 0, 1]),  # no size a multiple of the kernel's tiles (4, 16, 32)
    (3, 1, 16, [64], 7, [7, 6, 2, 3]),
    (9, 2, 50, [40, 96], 32, [32, 17, 31, 0]),
])
def test_kernel_handles_ranks_and_widths_off_its_tile_sizes(lanes, dtype, tokens, top_k, d_in, sizes, max_rank, ranks):
    """Short pair, rank and column tiles (a rank that is not a multiple of 4, widths that are not
    multiples of 16 or 32): the kernel against the float64 twin."""
    gen = torch.Generator().manual_seed(tokens + d_in + max_rank)
    groups, slots = len(sizes), 4
    x, lora_a, lora_b, y = _operands(dtype, tokens, d_in, sizes, slots, max_rank, gen)
    ranks_group = torch.tensor([ranks] * groups, dtype=torch.int32)
    scales = torch.rand(groups, slots, generator=gen) + 0.5
    s, w = _routes("per_token", tokens, top_k, slots, gen)
    got, want = _kernel_and_twin(x, lora_a, lora_b, ranks_group, scales, build_dispatch(s, w, slots), y, sizes)
    assert (got.double() - want).abs().max().item() <= TOL[dtype] * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_base_and_lora_in_one_call_equal_the_two_calls(lanes, monkeypatch, dtype, packed, with_bias):
    """The CPU backend's `base_and_apply_shared`: the base matmul (a dense or a oneDNN-packed
    weight) and the kernel's deltas in one call, equal to the base matmul then `apply_shared`."""
    from kernels import onednn

    if packed and not onednn.available(dtype):
        pytest.skip(f"this torch build or CPU has no oneDNN {dtype} linears")
    gen = torch.Generator().manual_seed(3)
    sizes, d_in, tokens = [48, 16, 16], 64, 9
    x, lora_a, lora_b, _ = _operands(dtype, tokens, d_in, sizes, 4, 8, gen)
    weight = torch.randn(sum(sizes), d_in, generator=gen).to(dtype)
    bias = torch.randn(sum(sizes), generator=gen).to(dtype) if with_bias else None
    ranks, scales = torch.tensor([[8, 4, 8, 2]] * 3, dtype=torch.int32), torch.rand(3, 4, generator=gen)
    s, w = _routes("per_token", tokens, 2, 4, gen)
    meta = build_dispatch(s, w, 4)
    backend = get_backend("cpu")
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, weight, bias)
        backend.apply_shared(x, lora_a, lora_b, ranks, scales, meta, list(want.split(sizes, 1)))
        got = backend.base_and_apply_shared(x, onednn.pack(weight) if packed else weight, bias, sizes, lora_a, lora_b,
                                            ranks, scales, meta)
    assert got.shape == (tokens, sum(sizes))
    if packed:  # oneDNN's matmul sums in another order than torch's
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    else:
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="sizes must sum"):
        lora_cpu.run_with_base(x, weight, bias, [48, 16], lora_cpu.Prepared.make(lora_a, lora_b, ranks, scales),
                               lora_cpu.step_routes(meta), 2)
    # Steps the kernel does not take leave the base to the caller (bf16: on a CPU with bf16 dot
    # products; elsewhere it takes every bf16 step).
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: cpu_ext.NATIVE_DOT_FLAGS[torch.bfloat16])
    prepared = lora_cpu.Prepared.make(lora_a, lora_b, ranks, scales)
    n = next(n for n in (lora_cpu.MAX_PAIRS + 1, lora_cpu.MAX_MACS_BF16 // prepared.macs_per_pair + 1)
             if not lora_cpu.takes(prepared, n))
    big = build_dispatch(torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, 1), 4)
    assert backend.base_and_apply_shared(torch.zeros(n, d_in, dtype=dtype), weight, bias, sizes, lora_a, lora_b, ranks,
                                         scales, big) is None
    assert backend.base_and_apply_shared(x, weight.float() if dtype != torch.float32 else weight.double(), None,
                                         sizes, lora_a, lora_b, ranks, scales, meta) is None
