import numpy as np
import pytest

from adapter_store.errors import AdapterInvalid, PickledWeights
from adapter_store.peft_validate import validate_adapter

from .peft_fixtures import adapter_tensors, lora_key, write_adapter


def test_valid_adapter(tmp_path, signature):
    d = write_adapter(tmp_path / "a", rank=8, modules=("q_proj", "k_proj", "down_proj"), dtype=np.float32)
    info = validate_adapter(d, signature, max_rank=16)
    assert info.rank == 8 and info.alpha == 16.0 and info.dtype == "F32"
    assert info.target_modules == ["down_proj", "k_proj", "q_proj"] and info.layers == [0, 1]


def test_all_linear_and_regex_targets(tmp_path, signature):
    d = write_adapter(tmp_path / "a", modules=("q_proj", "up_proj"), config={"target_modules": "all-linear"})
    assert validate_adapter(d, signature, max_rank=16).target_modules == ["q_proj", "up_proj"]
    d = write_adapter(tmp_path / "b", modules=("q_proj", "v_proj"), config={"target_modules": r".*\.(q_proj|v_proj)"})
    assert validate_adapter(d, signature, max_rank=16).target_modules == ["q_proj", "v_proj"]


def test_rank_pattern_changes_expected_shapes(tmp_path, signature):
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    tensors.update(adapter_tensors(signature, 2, ("v_proj",)))
    d = write_adapter(tmp_path / "a", modules=("q_proj", "v_proj"), config={"rank_pattern": {"v_proj": 2}},
                      tensors=tensors)
    assert validate_adapter(d, signature, max_rank=16).rank == 4


def test_rank_over_maximum(tmp_path, signature):
    d = write_adapter(tmp_path / "a", rank=32)
    with pytest.raises(AdapterInvalid, match="rank 32 is over the maximum rank 16"):
        validate_adapter(d, signature, max_rank=16)


def test_unknown_target_module(tmp_path, signature):
    d = write_adapter(tmp_path / "a", config={"target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(AdapterInvalid, match=r"unknown target modules \['lm_head'\]"):
        validate_adapter(d, signature, max_rank=16)


def test_shapes_that_do_not_fit_the_base_model(tmp_path, signature):
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    tensors[lora_key(1, "q_proj", "A")] = np.zeros((4, 65), np.float16)
    d = write_adapter(tmp_path / "a", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match=r"do not fit the base model.*expected \[4, 64\]"):
        validate_adapter(d, signature, max_rank=16)


def test_layer_out_of_range(tmp_path, signature):
    tensors = adapter_tensors(signature, 4, ("q_proj",), layers=[0, 5])
    d = write_adapter(tmp_path / "a", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="layer 5"):
        validate_adapter(d, signature, max_rank=16)


def test_missing_partner_and_foreign_tensor(tmp_path, signature):
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    del tensors[lora_key(0, "q_proj", "B")]
    d = write_adapter(tmp_path / "a", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="no lora_B partner"):
        validate_adapter(d, signature, max_rank=16)
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    tensors["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float16)
    d = write_adapter(tmp_path / "b", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="not a LoRA weight"):
        validate_adapter(d, signature, max_rank=16)


def test_tensor_outside_target_modules(tmp_path, signature):
    d = write_adapter(tmp_path / "a", modules=("q_proj", "v_proj"), config={"target_modules": ["q_proj"]})
    with pytest.raises(AdapterInvalid, match="does not list"):
        validate_adapter(d, signature, max_rank=16)


def test_pickled_weights_refused(tmp_path, signature):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PickledWeights, match="adapter_model.bin"):
        validate_adapter(d, signature, max_rank=16)


@pytest.mark.parametrize(
    "config, match",
    [({"r": 0}, "r=0"), ({"lora_alpha": -1}, "lora_alpha"), ({"use_dora": True}, "use_dora"),
     ({"peft_type": "IA3"}, "IA3"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
)
def test_bad_config_values(tmp_path, signature, config, match):
    d = write_adapter(tmp_path / "a", config=config)
    with pytest.raises(AdapterInvalid, match=match):
        validate_adapter(d, signature, max_rank=16)


def test_missing_and_corrupt_config(tmp_path, signature):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterInvalid, match="not valid JSON"):
        validate_adapter(d, signature, max_rank=16)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterInvalid, match="missing"):
        validate_adapter(d, signature, max_rank=16)


def test_mixed_or_integer_dtypes(tmp_path, signature):
    tensors = adapter_tensors(signature, 4, ("q_proj",))
    tensors[lora_key(0, "q_proj", "A")] = tensors[lora_key(0, "q_proj", "A")].astype(np.float32)
    d = write_adapter(tmp_path / "a", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="mix dtypes"):
        validate_adapter(d, signature, max_rank=16)
    tensors = adapter_tensors(signature, 4, ("q_proj",), dtype=np.int32)
    d = write_adapter(tmp_path / "b", modules=("q_proj",), tensors=tensors)
    with pytest.raises(AdapterInvalid, match="dtype I32"):
        validate_adapter(d, signature, max_rank=16)
