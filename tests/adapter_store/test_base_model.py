import pytest

from adapter_store.base_model import BaseModelSignature
from adapter_store.errors import ConfigError

QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 6144, "num_hidden_layers": 28,
}


def test_qwen3_shapes_use_explicit_head_dim():
    sig = BaseModelSignature.from_hf_config(QWEN3_1_7B)
    assert sig.architecture == "Qwen3ForCausalLM" and sig.num_layers == 28
    shapes = {k: (v.d_in, v.d_out) for k, v in sig.modules.items()}
    assert shapes == {
        "q_proj": (2048, 2048), "k_proj": (2048, 1024), "v_proj": (2048, 1024), "o_proj": (2048, 2048),
        "gate_proj": (2048, 6144), "up_proj": (2048, 6144), "down_proj": (6144, 2048),
    }


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = {"model_type": "qwen3", **{k: v for k, v in QWEN3_1_7B.items() if k not in ("head_dim", "architectures")}}
    cfg["num_attention_heads"] = 32
    sig = BaseModelSignature.from_hf_config(cfg)
    assert sig.modules["k_proj"].d_out == 8 * 64 and sig.architecture == "Qwen3ForCausalLM"


def test_id_is_stable_and_ignores_name(tmp_path):
    a = BaseModelSignature.from_hf_config(QWEN3_1_7B, name="x")
    b = BaseModelSignature.from_hf_config(dict(QWEN3_1_7B), name="y")
    assert a.id == b.id and a.id.startswith("sig-")
    c = BaseModelSignature.from_hf_config({**QWEN3_1_7B, "num_hidden_layers": 27})
    assert c.id != a.id
    (tmp_path / "config.json").write_text(__import__("json").dumps(QWEN3_1_7B))
    assert BaseModelSignature.from_hf_config(tmp_path).id == a.id
    assert BaseModelSignature.model_validate_json(a.model_dump_json()).id == a.id


def test_unsupported_architecture():
    with pytest.raises(ConfigError, match="gpt2"):
        BaseModelSignature.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
