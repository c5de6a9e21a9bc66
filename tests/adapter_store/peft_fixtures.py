"""Small PEFT adapters and base-model configs made on the spot (numpy + safetensors, no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapter_store.base_model import ALL_MODULES, BaseModelSignature

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
}


def tiny_signature() -> BaseModelSignature:
    return BaseModelSignature.from_hf_config(TINY_CONFIG, name="tiny-llama")


def lora_key(layer: int, module: str, ab: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{ab}.weight"


def adapter_tensors(sig: BaseModelSignature, rank: int, modules=ALL_MODULES, layers=None, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    layers = range(sig.num_layers) if layers is None else layers
    out = {}
    for layer in layers:
        for m in modules:
            shape = sig.modules[m]
            out[lora_key(layer, m, "A")] = rng.standard_normal((rank, shape.d_in)).astype(dtype)
            out[lora_key(layer, m, "B")] = rng.standard_normal((shape.d_out, rank)).astype(dtype)
    return out


def write_adapter(
    directory: Path, sig: BaseModelSignature | None = None, *, rank: int = 4, modules=("q_proj", "v_proj"),
    layers=None, dtype=np.float16, seed: int = 0, config: dict | None = None, tensors: dict | None = None,
) -> Path:
    """A PEFT adapter directory: adapter_config.json + adapter_model.safetensors."""
    sig = sig or tiny_signature()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(modules), "use_rslora": False, "base_model_name_or_path": "tiny-llama",
        "rank_pattern": {}, "alpha_pattern": {},
    }
    cfg.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    weights = tensors if tensors is not None else adapter_tensors(sig, rank, modules, layers, dtype, seed)
    save_file(weights, str(directory / "adapter_model.safetensors"))
    return directory


def write_router(directory: Path, adapters: list[str], hidden: int = 64, seed: int = 0, *, config: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """A gate router directory as molora_core.routing.GateRouter.save writes it, over ``adapters``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(adapters)
    weights = {"gate.weight": rng.standard_normal((n, hidden)).astype(np.float32),
               "gate.bias": np.zeros((n,), np.float32)}
    save_file(tensors if tensors is not None else weights, str(directory / "router.safetensors"))
    cfg = {"kind": "gate", "format_version": 1, "adapters": list(adapters), "top_k": min(2, n),
           "hidden_size": hidden, "input": "embedding", "normalize": "rms", **(config or {})}
    (directory / "router.json").write_text(json.dumps(cfg))
    return directory


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """Write a safetensors file by hand (for corrupt/odd headers)."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path
