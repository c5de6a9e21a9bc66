"""Reading PEFT directories: the options we serve, and clear refusals for the rest."""

import json

import pytest
import torch
from safetensors.torch import save_file

from molora_core.errors import AdapterInvalid
from molora_core.peft_io import load_peft_adapter, save_peft_adapter
from tests.molora_core.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.up_proj": (16, 24)}


def _write(path, config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    base.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(base))
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _pair(rank=4, d_in=16, d_out=16):
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, d_in),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(d_out, rank),
    }


def test_round_trip_keeps_weights_and_scales(tmp_path):
    adapter = random_adapter(SHAPES, "a", rank=4, seed=0, scale=2.0)
    loaded = load_peft_adapter(save_peft_adapter(adapter, tmp_path / "a", lora_alpha=8), name="a")
    assert set(loaded.modules) == set(SHAPES)
    for path, module in adapter.modules.items():
        assert torch.equal(loaded.modules[path].lora_a, module.lora_a)
        assert loaded.modules[path].scale == pytest.approx(2.0)
    assert loaded.target_modules == ["q_proj", "up_proj"]


def test_scale_rules(tmp_path):
    tensors = _pair(rank=4)
    assert load_peft_adapter(_write(tmp_path / "p", {}, tensors)).modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    rs = load_peft_adapter(_write(tmp_path / "r", {"use_rslora": True}, tensors))
    assert rs.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    ap = load_peft_adapter(_write(tmp_path / "a", {"alpha_pattern": {"q_proj": 2}}, tensors))
    assert ap.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(0.5)


def test_pattern_keys_and_the_alpha_default_are_peft_s(tmp_path):
    """A pattern key is a regex whose every alternative ends the module's path (PEFT groups it);
    a config without lora_alpha takes LoraConfig's default, 8, not r."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    tensors = {**_pair(rank=4), **{k.replace("q_proj", "v_proj"): v for k, v in _pair(rank=4).items()}}
    config = {"target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"q_proj|v_proj": 32}}
    adapter = load_peft_adapter(_write(tmp_path / "alt", config, tensors))
    for module in ("q_proj", "v_proj"):
        path = f"model.layers.0.self_attn.{module}"
        assert get_pattern_key(["q_proj|v_proj"], path) == "q_proj|v_proj"  # PEFT: the key applies
        assert adapter.modules[path].scale == pytest.approx(32 / 4)
    _write(tmp_path / "noalpha", {}, _pair(rank=4))
    raw = json.loads((tmp_path / "noalpha" / "adapter_config.json").read_text())
    del raw["lora_alpha"]
    (tmp_path / "noalpha" / "adapter_config.json").write_text(json.dumps(raw))
    scale = load_peft_adapter(tmp_path / "noalpha").modules["model.layers.0.self_attn.q_proj"].scale
    assert scale == pytest.approx(LoraConfig().lora_alpha / 4)


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({"use_dora": True}, _pair(), "use_dora=true is not supported"),
        ({"modules_to_save": ["lm_head"]}, _pair(), "modules_to_save"),
        ({"bias": "all"}, _pair(), "bias='all' is not supported"),
        ({"peft_type": "IA3"}, _pair(), "peft_type 'IA3' is not supported"),
        ({"r": 8}, _pair(rank=4), r"expected \[8, D_in\] and \[D_out, 8\]"),
        ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16)}, "has lora_A only"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 16)}, "is not a LoRA weight"),
        ({}, {k: v.fill_(float("inf")) for k, v in _pair().items()}, "NaN or Inf"),
        ({"alpha_pattern": {"(": 2}}, _pair(), "key '\\(' is not a valid regex"),
        ({"alora_invocation_tokens": [5, 6]}, _pair(), "alora_invocation_tokens is set"),
    ],
    ids=["dora", "modules-to-save", "bias", "peft-type", "rank-mismatch", "half-pair", "unknown-key", "inf",
         "bad-pattern", "activated-lora"],
)
def test_unsupported_or_broken_adapters_are_refused(tmp_path, config, tensors, match):
    with pytest.raises(AdapterInvalid, match=match):
        load_peft_adapter(_write(tmp_path / "x", config, tensors))


def test_pickled_bin_is_refused(tmp_path):
    path = _write(tmp_path / "pickled")
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterInvalid, match="pickled checkpoint, which is refused"):
        load_peft_adapter(path)


def test_missing_files_and_corrupt_safetensors(tmp_path):
    with pytest.raises(AdapterInvalid, match="adapter_config.json is missing"):
        load_peft_adapter(tmp_path)
    path = _write(tmp_path / "nofile")
    with pytest.raises(AdapterInvalid, match="adapter_model.safetensors is missing"):
        load_peft_adapter(path)
    path = _write(tmp_path / "corrupt", tensors=_pair())
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterInvalid, match="not a readable safetensors file"):
        load_peft_adapter(path)
