"""The decoder's compiled CPU ops (kernels.decode_cpu) against the torch ops they replace, and the
decoder's choice between them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_ext, decode_cpu
from molora_core.model.layers import RMSNorm, rms_norm_heads
from molora_core.model.rope import apply_rope

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One unit in the last place of each dtype at magnitude ~4: the fp32 sum of squares runs in
# another order than torch's, which may move a rounding by one unit; nothing more may differ.
ULP = {torch.float32: 4e-6, torch.bfloat16: 3.2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def _gen():
    return torch.Generator().manual_seed(0)


def test_enabled_only_for_cpu_inference():
    assert cpu_ext.available()
    x = torch.zeros(2, 4)
    assert decode_cpu.enabled(x)
    assert not decode_cpu.enabled(x.to(torch.int32))
    with torch.inference_mode(False), torch.enable_grad():
        assert not decode_cpu.enabled(torch.zeros(2, 4))  # autograd: the torch path records it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_the_torch_path(dtype, residual):
    gen = _gen()
    wide = (torch.randn(7, 96, generator=gen) * 3).to(dtype)
    x = wide[:, 16:80]  # a column slice: rows strided
    r = (torch.randn(7, 64, generator=gen) * 3).to(dtype) if residual else None
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.copy_((torch.rand(64, generator=gen) + 0.5).to(dtype))
    out, total = decode_cpu.rms_norm(x, norm.weight, norm.eps, r)
    want_total = x + r if residual else x
    want = norm._torch(want_total)
    assert out.dtype == dtype and out.shape == (7, 64)
    assert (out.float() - want.float()).abs().max() <= ULP[dtype]
    if residual:
        assert torch.equal(total, want_total)  # the add is one rounding, as torch's
    else:
        assert total is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_matches_the_torch_path(dtype, qk_norm):
    from molora_core.model.config import from_hf_config
    from molora_core.model.rope import RotaryEmbedding
    from transformers import Qwen3Config

    heads, kv_heads, head_dim, t = 4, 2, 32, 9
    cfg = from_hf_config(Qwen3Config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                     head_dim=head_dim, intermediate_size=64, num_hidden_layers=1, vocab_size=32))
    gen = _gen()
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim)  # strided, as in the decoder
    cos, sin = RotaryEmbedding(cfg).cos_sin(torch.randint(0, 64, (t,), generator=gen), dtype)
    q_norm, k_norm = RMSNorm(head_dim, 1e-6).to(dtype), RMSNorm(head_dim, 1e-6).to(dtype)
    for norm in (q_norm, k_norm):
        norm.weight.copy_((torch.rand(head_dim, generator=gen) + 0.5).to(dtype))
    weights = (q_norm.weight, k_norm.weight) if qk_norm else (None, None)
    got = decode_cpu.qk_norm_rope(qk, heads, *weights, 1e-6, cos, sin)
    want = apply_rope(rms_norm_heads(qk, heads, q_norm, k_norm) if qk_norm else qk, cos, sin)
    assert got.is_contiguous() and got.shape == want.shape
    if qk_norm or dtype == torch.float32:  # fp32: the compiler fuses x * cos + r * sin into one FMA
        assert (got.float() - want.float()).abs().max() <= 2 * ULP[dtype]
    else:
        assert torch.equal(got, want)  # 16-bit RoPE alone: the same three roundings, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_matches_index_put(dtype):
    gen = _gen()
    cache = torch.zeros(2, 5, 2, 6, 8, dtype=dtype)  # k and v, [S, H_kv, N, D_h] each
    kv = torch.randn(3, 2, 2, 8, generator=gen).to(dtype)  # [T, k/v, H_kv, D_h]
    slots, positions = torch.tensor([4, 0, 2]), torch.tensor([5, 0, 3])
    decode_cpu.kv_write(cache[0], cache[1], slots, positions, kv[:, 0], kv[:, 1])
    want = torch.zeros_like(cache)
    heads = torch.arange(2)
    want[0].index_put_((slots[:, None], heads[None, :], positions[:, None]), kv[:, 0])
    want[1].index_put_((slots[:, None], heads[None, :], positions[:, None]), kv[:, 1])
    assert torch.equal(cache, want)


def test_kv_write_refuses_rows_outside_the_cache():
    cache = torch.zeros(2, 3, 1, 4, 2)
    kv = torch.ones(1, 1, 2)
    with pytest.raises(RuntimeError, match="positions holds 4, outside"):
        decode_cpu.kv_write(cache[0], cache[1], torch.tensor([0]), torch.tensor([4]), kv, kv)
    with pytest.raises(RuntimeError, match="slots holds 3, outside"):
        decode_cpu.kv_write(cache[0], cache[1], torch.tensor([3]), torch.tensor([0]), kv, kv)
    assert not cache.any()  # checked before anything is written


def _attention_ref(q, k_cache, v_cache, slots, lens, window):
    out = []
    groups = q.shape[1] // k_cache.shape[1]
    for i in range(q.shape[0]):
        lo = max(0, int(lens[i]) - window) if window else 0
        k = k_cache[slots[i], :, lo : lens[i]].double().repeat_interleave(groups, 0)  # [H, n, D_h]
        v = v_cache[slots[i], :, lo : lens[i]].double().repeat_interleave(groups, 0)
        p = torch.softmax(q[i].double()[:, None] @ k.transpose(1, 2) * q.shape[-1] ** -0.5, -1)
        out.append((p @ v)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_sdpa(dtype, window):
    gen = _gen()
    slots_total, kv_heads, heads, n, d = 6, 2, 8, 24, 32
    k_cache = torch.randn(slots_total, kv_heads, n, d, generator=gen).to(dtype)
    v_cache = torch.randn(slots_total, kv_heads, n, d, generator=gen).to(dtype)
    k_cache[1] = v_cache[1] = float("nan")  # a slot no row reads: must not leak
    qkv = torch.randn(4, heads + 4, d, generator=gen).to(dtype)
    q = qkv[:, :heads]  # strided rows, as the decoder's
    slots, lens = torch.tensor([3, 0, 5, 2]), torch.tensor([1, 9, 24, 17])
    rows = torch.tensor([6, 0, 2, 3])  # flat token rows in a mixed step
    out = torch.full((7, heads, d), 7.0, dtype=dtype)
    decode_cpu.decode_attention(q, k_cache, v_cache, slots, lens, rows, d**-0.5, window, out)
    want = _attention_ref(q, k_cache, v_cache, slots, lens, window)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert (out[rows].double() - want).abs().max() <= tol
    untouched = torch.ones(7, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == 7.0).all()
    if window is None:  # and SDPA, the op it replaces, agrees
        sdpa = torch.stack([F.scaled_dot_product_attention(
            q[i : i + 1, :, None].float(), k_cache[slots[i : i + 1], :, : lens[i]].float(),
            v_cache[slots[i : i + 1], :, : lens[i]].float(), enable_gqa=True)[0, :, 0] for i in range(4)])
        assert (out[rows].float() - sdpa).abs().max() <= tol


def test_decode_attention_refuses_bad_lengths():
    cache = torch.zeros(2, 1, 4, 8)
    q, out = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="lens holds 5, outside"):
        decode_cpu.decode_attention(q, cache, cache, torch.tensor([0]), torch.tensor([5]), torch.tensor([0]), 1.0, None,
                                    out)
    with pytest.raises(RuntimeError, match="heads be a multiple"):
        decode_cpu.decode_attention(torch.zeros(1, 3, 8), torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8),
                                    torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), 1.0, None, out)


def test_the_decoder_takes_the_compiled_ops_and_matches_the_torch_path(tmp_path, monkeypatch):
    """A cached decode step of a Qwen3 model (q/k norm, GQA, a sliding-window-free config) runs
    every compiled op, and its logits equal the torch ops' to fp32 rounding."""
    from molora_core.model import KVCache, StepBatch, load_model
    from tests.molora_core.test_decoder import ids_for, make_checkpoint

    _, path = make_checkpoint(tmp_path, "qwen3")
    model = load_model(path, dtype=torch.float32)
    prompts = [ids_for(1, 7, seed=1)[0], ids_for(1, 4, seed=2)[0]]

    def run():
        cache = KVCache.for_model(model, max_seqs=3, max_seq_len=12)
        batch = StepBatch.build([2, 0], [6, 3], [6, 3])  # prefill all but each prompt's last token
        model(torch.cat([p[:-1] for p in prompts]), batch.positions(), batch, cache)
        batch = StepBatch.build([2, 0], [1, 1], [7, 4])
        return model(torch.stack([p[-1] for p in prompts]), batch.positions(), batch, cache)

    calls = []
    for name in ("rms_norm", "qk_norm_rope", "kv_write", "decode_attention"):
        original = getattr(decode_cpu, name)
        monkeypatch.setattr(decode_cpu, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    compiled = run()
    assert set(calls) == {"rms_norm", "qk_norm_rope", "kv_write", "decode_attention"}
    monkeypatch.setattr(decode_cpu, "enabled", lambda x: False)
    assert (compiled - run()).abs().max() <= 1e-4


def test_switched_off_by_the_environment():
    """MOLORA_CPU_KERNELS=0: no extension, so the LoRA backend and the decoder keep to torch ops."""
    code = ("import torch; from kernels import cpu_ext, decode_cpu, lora_cpu; "
            "print(cpu_ext.available(), lora_cpu.available(), decode_cpu.enabled(torch.zeros(1)))")
    env = {**os.environ, cpu_ext.ENV_SWITCH: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.split() == ["False", "False", "False"]


@pytest.mark.parametrize("vocab", [1, 7, 4096, 151936])
def test_argmax_matches_torch_ties_and_nan_included(vocab):
    gen = _gen()
    logits = torch.randn(5, vocab, generator=gen)
    if vocab > 1:
        logits[1, vocab // 3] = logits[1, vocab - 1] = 99.0  # a tie: the first index wins
        logits[2, vocab // 2] = float("nan")  # NaN wins, as in torch
        logits[2, vocab - 1] = float("nan")
        logits[3] = float("-inf")
    assert torch.equal(decode_cpu.argmax(logits), logits.argmax(-1))
    strided = torch.randn(4, 2 * vocab, generator=gen)[:, ::2]  # no unit stride: torch's argmax
    assert torch.equal(decode_cpu.argmax(strided), strided.argmax(-1))


def _gate_route_torch(hidden, weight, bias, eps, top_k, lookup):
    """The gate router's routes in torch ops (molora_core.routing.gate: forward, then the lookup)."""
    logits = F.linear(F.rms_norm(hidden.float(), (hidden.shape[-1],), None, eps), weight, bias)
    top, index = logits.topk(top_k, dim=-1)
    return lookup.long()[index].int(), torch.softmax(top, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim,adapters,top_k", [(1, 8, 1, 1), (16, 256, 4, 2), (37, 100, 6, 3), (512, 64, 3, 3)])
def test_gate_route_matches_the_torch_ops(dtype, tokens, dim, adapters, top_k):
    gen = _gen()
    hidden = (3 * torch.randn(tokens, 2 * dim, generator=gen)).to(dtype)[:, :dim]  # rows of any stride
    weight, bias = torch.randn(adapters, dim, generator=gen), torch.randn(adapters, generator=gen)
    lookup = torch.randperm(adapters, generator=gen).to(torch.int32) + 2
    slots, weights = decode_cpu.gate_route(hidden, weight, bias, 1e-6, top_k, lookup)
    want_slots, want_weights = _gate_route_torch(hidden, weight, bias, 1e-6, top_k, lookup)
    assert slots.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(slots, want_slots)  # the logits differ by summation order only: no ties here to flip
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)


def test_gate_route_ties_go_to_the_lower_adapter_and_nan_ranks_first():
    hidden = torch.ones(3, 4)
    weight = torch.zeros(4, 4)
    bias = torch.tensor([1.0, 2.0, 2.0, 0.0])
    lookup = torch.tensor([10, 11, 12, 13], dtype=torch.int32)
    slots, weights = decode_cpu.gate_route(hidden, weight, bias, 1e-6, 2, lookup)
    assert slots.tolist() == [[11, 12]] * 3
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5))
    nan_bias = torch.tensor([1.0, float("nan"), 2.0, 0.0])
    slots, weights = decode_cpu.gate_route(hidden, weight, nan_bias, 1e-6, 2, lookup)
    assert slots[0].tolist() == [11, 12] and weights.isnan().all()  # as torch.topk and softmax order them


def test_gate_route_refuses_operands_it_does_not_take():
    hidden, lookup = torch.randn(2, 4), torch.arange(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32 \\[A, D\\]"):
        decode_cpu.gate_route(hidden, torch.randn(3, 5), torch.zeros(3), 1e-6, 1, lookup)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        decode_cpu.gate_route(hidden, torch.randn(3, 4), torch.zeros(3), 1e-6, 4, lookup)
    with pytest.raises(RuntimeError, match="lookup must be"):
        decode_cpu.gate_route(hidden, torch.randn(3, 4), torch.zeros(3), 1e-6, 1, lookup.long())
