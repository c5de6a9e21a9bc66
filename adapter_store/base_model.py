"""The base model's signature: what an adapter's shapes are checked against.

Computed from a Hugging Face ``config.json`` of the Llama / Qwen2 / Qwen3 / Mistral family. Every
decoder layer has the same seven projections, so one (D_in, D_out) per module describes them all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class ModuleShape(BaseModel):
    model_config = ConfigDict(frozen=True)
    d_in: int = Field(gt=0, description="Input features of the base linear (lora_a is [R, d_in]).")
    d_out: int = Field(gt=0, description="Output features of the base linear (lora_b is [d_out, R]).")


class BaseModelSignature(BaseModel):
    """Architecture, depth and per-module shapes of a base model, with a stable id."""

    model_config = ConfigDict(frozen=True)
    architecture: str = Field(description="HF architecture class, e.g. Qwen3ForCausalLM.")
    num_layers: int = Field(gt=0, description="num_hidden_layers of the base model.")
    modules: dict[str, ModuleShape] = Field(description="Projection name -> (d_in, d_out).")
    name: str = Field("", description="Informational: the model's name or path; not part of the id.")

    @property
    def hidden_size(self) -> int | None:
        """The residual stream's width (what a gate router reads), or None when the signature
        holds none of the modules that show it."""
        for module, side in (("q_proj", "d_in"), ("gate_proj", "d_in"), ("o_proj", "d_out"), ("down_proj", "d_out")):
            if module in self.modules:
                return getattr(self.modules[module], side)
        return None

    @property
    def id(self) -> str:
        """Stable id: a hash of architecture, depth and shapes (the name does not count)."""
        body = {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "modules": {k: [v.d_in, v.d_out] for k, v in sorted(self.modules.items())},
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return f"sig-{digest[:16]}"

    @classmethod
    def from_hf_config(cls, config: dict | str | Path, name: str = "") -> "BaseModelSignature":
        """Build from a config.json dict, a path to config.json, or a model directory."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"cannot read base model config {path}: {e}") from None
            name = name or str(path.parent)
        model_type = config.get("model_type")
        archs = config.get("architectures") or [SUPPORTED_MODEL_TYPES.get(model_type, "")]
        arch = archs[0]
        if model_type not in SUPPORTED_MODEL_TYPES and arch not in SUPPORTED_MODEL_TYPES.values():
            raise ConfigError(
                f"base model type {model_type!r} / {arch!r} is not supported, "
                f"expected one of {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            inter = int(config["intermediate_size"])
            layers = int(config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"base model config lacks or has a bad {e}") from None
        q, kv = heads * head_dim, kv_heads * head_dim
        shapes = {
            "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        }
        return cls(
            architecture=arch,
            num_layers=layers,
            modules={k: ModuleShape(d_in=i, d_out=o) for k, (i, o) in shapes.items()},
            name=name or str(config.get("_name_or_path", "")),
        )
