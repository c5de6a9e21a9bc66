"""Our decoder's logits equal transformers' for the same tiny checkpoint, family by family.

Every checkpoint is built here with random weights (no downloads), saved as safetensors by
`save_pretrained`, and loaded by our loader; transformers' model is the oracle.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from molora_core.model import load_model

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
FP32_ATOL = 1e-4


def make_checkpoint(tmp_path, family: str, seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny random `family` model under tmp_path; return (transformers model, path).

    Weights get N(0, 0.1) noise on top of transformers' init so that norms, biases and every
    projection matter (at init biases are 0 and norms are 1, which would hide mistakes).
    """
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / family
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model, path


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_parity(hf_model, path, ids, atol=FP32_ATOL):
    ours = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        got = ours.forward_dense(ids)
    want = hf_logits(hf_model, ids)
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol} (logits max {want.abs().max():.3g})"
    return ours


def ids_for(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_parity(tmp_path, family):
    hf, path = make_checkpoint(tmp_path, family)
    ours = assert_parity(hf, path, ids_for(2, 17))
    names = set(dict(ours.named_parameters()))
    assert set(hf.state_dict()) - names <= {"lm_head.weight"} and names <= set(hf.state_dict())


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 0.8,
        "mscale_all_dim": 0.5,
    },
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_parity(tmp_path, variant):
    rope = {**ROPE_VARIANTS[variant], "rope_theta": 10000.0}
    # dynamic NTK only rescales past max_position_embeddings: make the prompt longer than that.
    mpe = 16 if variant == "dynamic" else 64
    hf, path = make_checkpoint(tmp_path, "llama", rope_parameters=rope, max_position_embeddings=mpe)
    assert_parity(hf, path, ids_for(1, 40))


def test_qwen2_yarn_and_large_theta(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e6}
    hf, path = make_checkpoint(tmp_path, "qwen2", rope_parameters=rope)
    assert_parity(hf, path, ids_for(1, 48))


def test_legacy_rope_scaling_config(tmp_path):
    """Old config.json (top-level rope_theta + rope_scaling{"type": ...}) reads as transformers reads it."""
    _, path = make_checkpoint(tmp_path, "llama")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 3.0})
    (path / "config.json").write_text(json.dumps(raw))
    hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "linear"
    ours = assert_parity(hf, path, ids_for(1, 30))
    assert ours.rotary.rope_type == "linear" and ours.rotary.base == 50000.0


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tied_embeddings(tmp_path, family):
    hf, path = make_checkpoint(tmp_path, family, tie_word_embeddings=True)
    ours = assert_parity(hf, path, ids_for(2, 9))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_a_tied_config_whose_checkpoint_holds_its_own_head_reads_as_transformers(tmp_path, caplog):
    """tie_word_embeddings set, and the checkpoint holds an lm_head.weight: transformers uses a
    head that differs from the embeddings (untied) and ties an equal one; so do we."""
    hf, path = make_checkpoint(tmp_path, "qwen3")  # untied: its own lm_head, saved
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": True}))
    hf = Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with caplog.at_level(logging.WARNING, logger="molora_core.model.loader"):
        ours = assert_parity(hf, path, ids_for(2, 9))
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert any("using the stored lm_head" in r.getMessage() for r in caplog.records)
    weights = load_file(path / "model.safetensors")
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}, path / "model.safetensors")
    hf = Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = assert_parity(hf, path, ids_for(2, 9))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_a_null_partial_rotary_factor_reads_as_one(tmp_path):
    """`partial_rotary_factor: null` in rope_parameters: transformers reads the default 1.0."""
    _, path = make_checkpoint(tmp_path, "llama")
    raw = json.loads((path / "config.json").read_text())
    raw["rope_parameters"]["partial_rotary_factor"] = None
    (path / "config.json").write_text(json.dumps(raw))
    assert_parity(LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval(), path, ids_for(1, 20))


def test_qwen2_qkv_bias_and_no_o_bias(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen2")
    ours = assert_parity(hf, path, ids_for(2, 11))
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert attn.q_proj.bias.abs().max() > 0


def test_qwen3_qk_norm_and_attention_bias(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen3", attention_bias=True, head_dim=32)
    ours = assert_parity(hf, path, ids_for(2, 11))
    attn = ours.model.layers[1].self_attn
    assert attn.q_norm.weight.shape == (32,) and attn.o_proj.bias is not None


def test_llama_attention_and_mlp_bias(tmp_path):
    hf, path = make_checkpoint(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    assert_parity(hf, path, ids_for(2, 11))


def test_multi_query_attention(tmp_path):
    hf, path = make_checkpoint(tmp_path, "mistral", num_key_value_heads=1)
    assert_parity(hf, path, ids_for(2, 11))


def test_mistral_sliding_window(tmp_path):
    hf, path = make_checkpoint(tmp_path, "mistral", sliding_window=6)
    ours = assert_parity(hf, path, ids_for(1, 20))
    assert ours.config.sliding_windows == (6, 6)


def test_qwen2_sliding_layers(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    ours = assert_parity(hf, path, ids_for(1, 20))
    assert ours.config.sliding_windows == (None, 5)


def test_sharded_checkpoint(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen3", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    assert_parity(hf, path, ids_for(2, 9))


HALF_ATOL = {torch.bfloat16: 0.06, torch.float16: 0.01}  # for logits of magnitude ~3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(tmp_path, dtype):
    hf, path = make_checkpoint(tmp_path, "llama")
    ids = ids_for(2, 16)
    ref = hf_logits(hf, ids)
    ours = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    with torch.no_grad():
        got = ours.forward_dense(ids)
    want = hf_logits(hf.to(dtype), ids)
    assert got.dtype == dtype
    ours_err = (got.float() - ref).abs().max().item()
    hf_err = (want.float() - ref).abs().max().item()
    # Both are half-precision runs of the same math: ours is as far from fp32 as transformers' is.
    assert (got.float() - want.float()).abs().max() <= HALF_ATOL[dtype]
    assert ours_err <= 1.5 * hf_err + HALF_ATOL[dtype] / 10, (ours_err, hf_err)


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen3")
    ids = ids_for(2, 13)
    cpu = load_model(path, dtype=torch.float32)
    gpu = load_model(path, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        diff = (gpu.forward_dense(ids.cuda()).cpu() - cpu.forward_dense(ids)).abs().max()
    assert diff <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_joint_qk_norm_and_rope_equal_transformers_ops_bit_for_bit(dtype):
    """q_norm/k_norm over q's and k's heads side by side (rms_norm_heads) and the roll form of
    RoPE give exactly what transformers' Qwen3RMSNorm and apply_rotary_pos_emb give, in fp32 and
    in both 16-bit dtypes (same ops, same rounding); mismatched eps takes the two-norm fallback."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

    from molora_core.model.config import from_hf_config
    from molora_core.model.layers import RMSNorm, rms_norm_heads
    from molora_core.model.rope import RotaryEmbedding, apply_rope

    heads, kv_heads, head_dim, t = 8, 2, 32, 13
    hf_cfg = Qwen3Config(**{**TINY, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim})
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(t, (heads + kv_heads) * head_dim, generator=gen) * 3).to(dtype).view(t, heads + kv_heads, head_dim)
    positions = torch.randint(0, 64, (t,), generator=gen)
    ours, theirs = [], []
    for eps in (1e-6, 1e-5):
        norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, eps)
        hf_norm = Qwen3RMSNorm(head_dim, 1e-6), Qwen3RMSNorm(head_dim, eps)
        for a, b in zip(norm, hf_norm):
            w = torch.rand(head_dim, generator=gen) + 0.5
            a.weight.data.copy_(w)
            b.weight.data.copy_(w)
            a.to(dtype), b.to(dtype)
        ours.append(rms_norm_heads(x, heads, *norm))
        theirs.append(torch.cat((hf_norm[0](x[:, :heads]), hf_norm[1](x[:, heads:])), dim=1))
    with torch.no_grad():
        cos, sin = RotaryEmbedding(from_hf_config(hf_cfg)).cos_sin(positions, dtype)
        hf_cos, hf_sin = Qwen3RotaryEmbedding(hf_cfg)(x, positions[None])
        for got, want in zip(ours, theirs):
            assert torch.equal(got, want)
            q, k = apply_rotary_pos_emb(want[None, :, :heads].transpose(1, 2), want[None, :, heads:].transpose(1, 2),
                                        hf_cos, hf_sin)
            assert torch.equal(apply_rope(got, cos, sin), torch.cat((q, k), dim=1)[0].transpose(0, 1))
