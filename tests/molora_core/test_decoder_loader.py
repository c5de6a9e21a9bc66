"""Loading a model directory: tokenizer, and clear errors for what is missing or unsupported."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from molora_core.errors import ModelLoadError
from molora_core.model import SUPPORTED_ARCHITECTURES, load_config, load_model, load_pretrained, load_tokenizer
from tests.molora_core.test_decoder import make_checkpoint


def save_tiny_tokenizer(path):
    """A word-level tokenizer over 128 ids, built locally with `tokenizers`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


@pytest.fixture
def checkpoint(tmp_path):
    hf, path = make_checkpoint(tmp_path, "qwen2")
    return hf, path


def test_load_pretrained_with_tokenizer(tmp_path):
    # Llama: for a qwen2 model_type, transformers swaps a generic tokenizer for Qwen2Tokenizer.
    _, path = make_checkpoint(tmp_path, "llama")
    save_tiny_tokenizer(path)
    loaded = load_pretrained(path, dtype="bfloat16")
    ids = loaded.tokenizer("w5 w17 w99 nope")["input_ids"]
    assert ids == [5, 17, 99, 0]
    assert loaded.config.architecture == "LlamaForCausalLM"
    assert loaded.model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = loaded.model.forward_dense(torch.tensor([ids]))
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_dtype_defaults_to_config(checkpoint):
    _, path = checkpoint
    raw = json.loads((path / "config.json").read_text())
    raw["dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(raw))
    assert load_model(path).dtype == torch.float16


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(checkpoint):
    _, path = checkpoint
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(path)


def test_unsupported_architecture(checkpoint):
    _, path = checkpoint
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported") as err:
        load_config(path)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)


def test_unsupported_rope_type(tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 16}
    _, path = make_checkpoint(tmp_path, "llama", rope_parameters=rope)
    with pytest.raises(ModelLoadError, match="rope_type='longrope' is not supported"):
        load_model(path)


def test_missing_weights(checkpoint):
    _, path = checkpoint
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights; expected model.safetensors"):
        load_model(path)


def test_pickled_weights_refused(checkpoint):
    hf, path = checkpoint
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickled weights .*pytorch_model\.bin.*refused"):
        load_model(path)


def test_missing_shard(tmp_path):
    _, path = make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"shards .* missing: \\['{shard.name}'\\]"):
        load_model(path)


def test_missing_and_misshaped_tensors(checkpoint):
    _, path = checkpoint
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(path)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"up_proj.weight has shape \(3, 3\), the config expects \(96, 64\)"):
        load_model(path)


def test_unexpected_tensor(checkpoint):
    _, path = checkpoint
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"unexpected \['model.layers.0.self_attn.o_proj.bias'\]"):
        load_model(path)


def test_missing_tokenizer(checkpoint):
    _, path = checkpoint
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(path)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_pretrained(path)
