"""Registration refuses what the loader cannot serve: non-finite or absurd alphas, regexes that
do not compile or would backtrack for hours, options and tensor paths the model side refuses."""

import json
import math
import time

import numpy as np
import pytest
from pydantic import ValidationError

from adapter_store.errors import AdapterInvalid
from adapter_store.manifest import AdapterManifest
from adapter_store.peft_validate import validate_adapter

from .peft_fixtures import adapter_tensors, tiny_signature, write_adapter


def _refused(tmp_path, signature, param, match, **kwargs):
    d = write_adapter(tmp_path / "a", **kwargs)
    with pytest.raises(AdapterInvalid, match=match) as err:
        validate_adapter(d, signature, max_rank=16)
    assert err.value.param == param
    return err.value


@pytest.mark.parametrize("alpha", [math.inf, 1e308, 10**400])
def test_lora_alpha_must_be_finite_and_sane(tmp_path, signature, alpha):
    _refused(tmp_path, signature, "lora_alpha", "lora_alpha", config={"lora_alpha": alpha})


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e308])
def test_alpha_pattern_values_must_be_finite_and_sane(tmp_path, signature, value):
    _refused(tmp_path, signature, "alpha_pattern", "alpha_pattern", config={"alpha_pattern": {"q_proj": value}})


def test_manifest_refuses_non_finite_numbers(signature):
    fields = dict(name="a", sha256="0" * 64, size=0, files=[], rank=4, alpha=8.0, target_modules=["q_proj"],
                  layers=[0], dtype="F16", base_model=signature)
    AdapterManifest(**fields)
    for bad in ({"alpha": math.inf}, {"alpha_pattern": {"q_proj": math.inf}}, {"created_at": math.nan}):
        with pytest.raises(ValidationError, match="finite"):
            AdapterManifest(**{**fields, **bad})


@pytest.mark.parametrize(
    "config, param",
    [({"target_modules": "(.*)*z"}, "target_modules"),
     ({"rank_pattern": {"(.*)*z": 4}}, "rank_pattern"),
     ({"alpha_pattern": {"(.*)*z": 4.0}}, "alpha_pattern"),
     ({"alpha_pattern": {"(a|a)*z": 4.0}}, "alpha_pattern"),
     ({"rank_pattern": {r"(\w+\.?)+z": 4}}, "rank_pattern"),
     ({"alpha_pattern": {".*.*.*.*.*.*z": 4.0}}, "alpha_pattern")],
)
def test_catastrophic_patterns_are_refused_fast(tmp_path, signature, config, param):
    # target_modules: undecided within the deadline (or no module matched); pattern keys: refused
    # by shape, since the loader matches them with plain `re` and no time limit.
    started = time.monotonic()
    d = write_adapter(tmp_path / "a", config=config)
    with pytest.raises(AdapterInvalid) as err:
        validate_adapter(d, signature, max_rank=16)
    assert time.monotonic() - started < 10 and err.value.param == param


@pytest.mark.parametrize("field, value", [("rank_pattern", {"(": 4}), ("alpha_pattern", {"(": 4.0}),
                                          ("alpha_pattern", {"q_proj)|(x": 4.0}), ("target_modules", "(")])
def test_invalid_regexes_are_refused_simple_ones_pass(tmp_path, signature, field, value):
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    tensors.update(adapter_tensors(signature, 2, ("v_proj",)))
    d = write_adapter(tmp_path / "ok", modules=("q_proj", "v_proj"), tensors=tensors,
                      config={"rank_pattern": {r"layers\.[0-9]+\.self_attn\.v_proj": 2},
                              "alpha_pattern": {"(q|v)_proj": 3.0}})
    info = validate_adapter(d, signature, max_rank=16)
    assert info.rank == 4 and info.alpha_pattern == {"(q|v)_proj": 3.0}
    _refused(tmp_path, signature, field, "not a valid regex", config={field: value})


@pytest.mark.parametrize("config, param", [({"bias": "all"}, "bias"), ({"bias": "lora_only"}, "bias"),
                                           ({"fan_in_fan_out": True}, "fan_in_fan_out"),
                                           ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens")])
def test_options_the_loader_refuses(tmp_path, signature, config, param):
    _refused(tmp_path, signature, param, param, config=config)


@pytest.mark.parametrize(
    "path, match",
    [("base_model.model.layers.{l}.self_attn.q_proj", "not a LoRA weight"),       # no 'model.'
     ("base_model.model.model.layers.{l}.mlp.q_proj", "under 'mlp'"),            # wrong block
     ("base_model.model.model.layers.0{l}.self_attn.q_proj", "not a LoRA weight"),  # zero-padded index
     ("base_model.model.model.decoder.layers.{l}.self_attn.q_proj", "not a LoRA weight"),
     ("base_model.model.model.layers.{l}.block.self_attn.q_proj", "not a LoRA weight")],
)
def test_tensor_paths_the_hotset_does_not_hold(tmp_path, signature, path, match):
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(signature.num_layers):
        p = path.format(l=layer)
        tensors[f"{p}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float16)
        tensors[f"{p}.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float16)
    d = write_adapter(tmp_path / "a", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match=match):
        validate_adapter(d, tiny_signature(), max_rank=16)


def test_a_config_without_lora_alpha_takes_peft_s_default(tmp_path, signature):
    d = write_adapter(tmp_path / "a", rank=4)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert validate_adapter(d, signature, max_rank=16).alpha == 8.0  # peft.LoraConfig().lora_alpha, not r


def test_a_pattern_keys_alternatives_each_end_the_path(tmp_path, signature):
    """PEFT groups a key: rank_pattern {"q_proj|v_proj": 2} gives both modules rank 2 (only the
    first alternative got the path prefix, so v_proj's rank-2 tensors were refused)."""
    tensors = adapter_tensors(signature, 2, ("q_proj", "v_proj"))
    d = write_adapter(tmp_path / "a", rank=4, modules=("q_proj", "v_proj"), tensors=tensors,
                      config={"rank_pattern": {"q_proj|v_proj": 2}})
    assert validate_adapter(d, signature, max_rank=16).rank == 2
