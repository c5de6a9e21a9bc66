"""Sibling projections run as one (MoLoRAGroup), and base projections packed for oneDNN, give
the same outputs as every module run on its own."""

from __future__ import annotations

import pytest
import torch

from kernels import build_dispatch, get_backend, lora_cpu, onednn
from molora_core.hotset import HotSet
from molora_core.lora_layer import SHARED_INPUTS, MoLoRAGroup, groups_of, pack_for_cpu
from molora_core.model import DecoderForCausalLM, StepBatch, from_hf_config
from molora_core.model.packed import PackedLinear, pack_linears
from tests.molora_core.helpers import VOCAB, linear_shapes, molora_model, random_adapter, tiny_causal_lm


def _decoder(seed=0):
    hf = tiny_causal_lm("qwen3", seed=seed)
    model = DecoderForCausalLM(from_hf_config(hf.config))
    model.load_state_dict(hf.state_dict(), strict=False)
    return model.eval()


def _loaded(grouped: bool, seed=0):
    model, hotset, context = molora_model(_decoder(seed), num_slots=4, max_rank=16, grouped=grouped)
    shapes = linear_shapes(tiny_causal_lm("qwen3", seed=seed))
    for i, rank in enumerate([8, 16, 4]):
        adapter = random_adapter(shapes, f"a{i}", rank=rank, seed=40 + i)
        hotset.acquire(adapter.name, lambda a=adapter: a)
    return model, hotset, context


def _step(tokens: int, gen: torch.Generator):
    """A step's token ids, top-2 slots (some on no adapter, slot 3 unused) and weights."""
    ids = torch.randint(0, VOCAB, (tokens,), generator=gen)
    slots = torch.randint(-1, 3, (tokens, 2), generator=gen, dtype=torch.int32)
    return ids, slots, torch.rand(tokens, 2, generator=gen)


def _logits(model, context, slots, weights, ids):
    t = ids.shape[0]
    context.meta = build_dispatch(slots, weights, 4)
    with torch.no_grad():
        out = model(ids, torch.arange(t), StepBatch.build([0], [t], [t]))
    context.meta = None
    return out


def test_hotset_groups_share_lora_a_ranks_and_scales():
    model = tiny_causal_lm("qwen3")
    hotset = HotSet.for_model(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 3, 8,
                              shared_inputs=tuple(SHARED_INPUTS), b_layout="rank_major")
    attn = "model.layers.0.self_attn"
    q, k, o = (hotset.buffers[f"{attn}.{n}"] for n in ("q_proj", "k_proj", "o_proj"))
    assert q.group is k.group and o.group is not q.group and len(o.group.members) == 1
    assert q.lora_a_stacked.data_ptr() == q.group.lora_a.data_ptr()
    assert k.lora_a_stacked.data_ptr() == q.group.lora_a[1].data_ptr() and k.lora_a_stacked.is_contiguous()
    assert q.lora_b_stacked.shape == (3, q.d_out, 8) and q.lora_b_stacked.transpose(1, 2).is_contiguous()
    adapter = random_adapter(linear_shapes(model, ["q_proj", "k_proj", "v_proj", "o_proj"]), "x", 4, seed=1)
    slot = hotset.acquire("x", lambda: adapter)
    mod = adapter.modules[f"{attn}.k_proj"]
    assert torch.equal(k.lora_a_stacked[slot, :4], mod.lora_a) and torch.equal(k.lora_b_stacked[slot, :, :4], mod.lora_b)
    assert k.group.ranks[1, slot] == 4 and k.group.scales[1, slot] == mod.scale
    assert torch.equal(k.rank_scales[slot], torch.tensor([mod.scale] * 4 + [0.0] * 4))


def test_group_members_must_share_their_input_size():
    with pytest.raises(ValueError, match="one input size"):
        HotSet({"a": (8, 4), "b": (16, 4)}, 2, 4, groups=[("a", "b")])
    with pytest.raises(ValueError, match="missing"):
        HotSet({"a": (8, 4)}, 2, 4, groups=[("a", "b")])


def test_attach_installs_groups_and_keeps_the_state_dict():
    plain = _decoder()
    keys = set(plain.state_dict())
    model, hotset, _ = _loaded(grouped=True)
    groups = groups_of(model)
    assert len(groups) == 2 * model.config.num_layers and all(isinstance(g, MoLoRAGroup) for g in groups)
    assert set(model.state_dict()) == {k.replace("_proj.weight", "_proj.base.weight") for k in keys} | (
        {k.replace("_proj.bias", "_proj.base.bias") for k in keys if k.endswith("bias")})
    attn = model.model.layers[0].self_attn
    # Member weights are views of the group's concatenated weight: loading a state dict reaches it.
    assert attn.q_proj.weight.data_ptr() == attn.qkv_group.weight.data_ptr()
    attn.k_proj.base.weight.data.fill_(0.5)
    assert bool((attn.qkv_group.weight[attn.q_proj.out_features :][: attn.k_proj.out_features] == 0.5).all())


@pytest.mark.parametrize("num_tokens,top_k", [(6, 1), (6, 2), (70, 2)], ids=["decode", "decode-top2", "prefill-top2"])
def test_grouped_model_equals_module_by_module(num_tokens, top_k):
    gen = torch.Generator().manual_seed(5)
    grouped, _, ctx_g = _loaded(grouped=True)
    single, _, ctx_s = _loaded(grouped=False)
    assert not groups_of(single)
    ids = torch.randint(0, VOCAB, (num_tokens,), generator=gen)
    slots = torch.randint(-1, 3, (num_tokens, top_k), generator=gen, dtype=torch.int32)
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1)
    want = _logits(single, ctx_s, slots, weights, ids)
    got = _logits(grouped, ctx_g, slots, weights, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base = _logits(single, ctx_s, torch.full_like(slots, -1), weights, ids)
    assert (got - base).abs().max() > 1e-3  # the adapters changed something


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linears")
def test_packed_projections_match_dense_ones():
    gen = torch.Generator().manual_seed(9)
    ids, slots, weights = _step(12, gen)
    model, _, context = _loaded(grouped=True)
    want = _logits(model, context, slots, weights, ids)
    attn = model.model.layers[0].self_attn
    x = torch.randn(5, model.config.hidden_size, generator=gen)
    with torch.no_grad():
        q_alone = attn.q_proj(x)
    packed = pack_for_cpu(model)
    assert packed == 2 * model.config.num_layers + 2 * model.config.num_layers + 1  # groups, o/down, lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert attn.qkv_group.weight is None and isinstance(attn.o_proj.base, PackedLinear)
    assert model.model.embed_tokens.weight.shape == (VOCAB, model.config.hidden_size)  # the tied embedding stays
    got = _logits(model, context, slots, weights, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # a member run alone reads its columns of the packed group
        torch.testing.assert_close(attn.q_proj(x), q_alone, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not onednn.available() or not lora_cpu.available(), reason="needs oneDNN and the CPU kernel")
def test_packed_cpu_model_runs_each_projection_with_its_lora_in_one_call(monkeypatch):
    """With the CPU backend, each packed group and projection hands its packed weight over, so
    its base matmul and LoRA run in one compiled call (`lora_cpu.run_with_base`), to the logits
    of the torch backend's dense model."""
    ids, slots, weights = _step(9, torch.Generator().manual_seed(10))
    model, _, context = _loaded(grouped=True)
    want = _logits(model, context, slots, weights, ids)
    model, hotset, context = _loaded(grouped=True)
    context.backend = get_backend("cpu")
    pack_for_cpu(model)
    calls = []
    real = lora_cpu.run_with_base
    monkeypatch.setattr(lora_cpu, "run_with_base", lambda x, w, *a: calls.append(w.is_mkldnn) or real(x, w, *a))
    with torch.inference_mode():
        got = _logits(model, context, slots, weights, ids)
    assert calls == [True] * 4 * model.config.num_layers  # q/k/v, o, gate/up, down in each layer
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linears")
def test_pack_linears_on_a_plain_linear():
    layer = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8, bias=False))
    x = torch.randn(7, 3, 32)
    with torch.no_grad():
        want = layer(x)
        assert pack_linears(layer) == ["0", "2"]
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="float32 weights; got torch.float64"):
        layer[0](x.double())


@pytest.mark.skipif(not lora_cpu.available(), reason="needs the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_model_packs_what_this_cpu_can_and_stays_near_fp32(dtype):
    """The engine's CPU model in bf16 or fp16: projections packed for oneDNN where this torch build
    and CPU pack that dtype (bf16 with AVX-512 or AVX-NE-CONVERT; never fp16), dense elsewhere, and
    the CPU backend's kernel on top. Its logits stay as near the fp32 model's as a dense model of
    that dtype on the torch backend does."""
    ids, slots, weights = _step(9, torch.Generator().manual_seed(11))
    model, _, context = _loaded(grouped=True)
    want = _logits(model, context, slots, weights, ids)

    def half(backend):
        model, hotset, context = molora_model(_decoder().to(dtype), num_slots=4, max_rank=16, backend=backend,
                                              dtype=dtype)
        shapes = linear_shapes(tiny_causal_lm("qwen3"))
        for i, rank in enumerate([8, 16, 4]):
            adapter = random_adapter(shapes, f"a{i}", rank=rank, seed=40 + i)
            hotset.acquire(adapter.name, lambda a=adapter: a)
        return model, context

    dense, dense_context = half("torch")
    reference = _logits(dense, dense_context, slots, weights, ids)
    model, context = half("cpu")
    packed = pack_for_cpu(model)
    assert packed == (0 if dtype == torch.float16 or not onednn.available(dtype) else 4 * model.config.num_layers + 1)
    got = _logits(model, context, slots, weights, ids)
    assert got.dtype == dtype
    reference_err = (reference.float() - want).abs().max().item()
    assert 0 < reference_err < 0.2
    assert (got.float() - want).abs().max().item() <= 2 * reference_err
