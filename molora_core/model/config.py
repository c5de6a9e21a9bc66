"""The decoder's own config: the few fields the runtime reads, taken from a Hugging Face config.

Keeping a small frozen dataclass (instead of passing the transformers config around) means the
forward pass never touches transformers, and every family difference (biases, q/k norm, sliding
window, tied embeddings) is decided once here, by architecture, exactly as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from molora_core.errors import ModelLoadError

# architecture name (config.json "architectures") -> model_type, for the families the runtime runs.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and per-family switches of a Llama / Mistral / Qwen2 / Qwen3 decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # H_kv (grouped-query attention when < H)
    head_dim: int  # D_h
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]  # transformers' standardized rope_parameters (rope_type, rope_theta, ...)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over D_h on q and k before RoPE
    tie_word_embeddings: bool = False
    # Per layer: attend only to the last `w` positions (Mistral, Qwen sliding layers), None = full.
    sliding_windows: tuple[int | None, ...] = field(default=())
    hidden_act: str = "silu"

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ModelLoadError(
                f"{len(self.sliding_windows)} layer types for {self.num_layers} layers"
            )
        if self.rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"rope_type={self.rope.get('rope_type')!r} is not supported; "
                f"expected one of {SUPPORTED_ROPE_TYPES}"
            )
        if self.rope.get("partial_rotary_factor") not in (None, 1.0):  # (null: 1.0, as transformers reads it)
            raise ModelLoadError(
                f"partial_rotary_factor={self.rope['partial_rotary_factor']} is not supported "
                "by these families (expected 1.0)"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ModelLoadError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{SUPPORTED_ACTIVATIONS}"
            )

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def check_architecture(raw: dict, where: str = "config.json") -> str:
    """Return the supported architecture named in a raw config.json dict, or raise."""
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    model_type = raw.get("model_type")
    if not names and model_type in SUPPORTED_ARCHITECTURES.values():
        return next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type)
    raise ModelLoadError(
        f"{where}: architecture {names or model_type!r} is not supported; expected one of "
        f"{sorted(SUPPORTED_ARCHITECTURES)}"
    )


def from_hf_config(hf) -> DecoderConfig:
    """Build a DecoderConfig from a transformers config of a supported family.

    `hf` is a `PretrainedConfig` (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config); its
    rope parameters are standardized by transformers (legacy `rope_scaling` + `rope_theta`
    included), so this reads one place for them.
    """
    arch = check_architecture(
        {"architectures": getattr(hf, "architectures", None), "model_type": hf.model_type}
    )
    if SUPPORTED_ARCHITECTURES[arch] != hf.model_type:
        raise ModelLoadError(
            f"architecture {arch} does not match model_type={hf.model_type!r}; expected "
            f"{SUPPORTED_ARCHITECTURES[arch]!r}"
        )
    if hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if not rope:  # transformers 4.x: rope_theta + rope_scaling
        rope = dict(getattr(hf, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if any(k in rope for k in ("full_attention", "sliding_attention")):
        raise ModelLoadError("per-layer-type rope_parameters are not supported by these families")
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", hf.max_position_embeddings)

    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    family = hf.model_type
    window = getattr(hf, "sliding_window", None)
    if family == "mistral":
        windows = (window,) * hf.num_hidden_layers
    elif family in ("qwen2", "qwen3"):
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    else:
        windows = (None,) * hf.num_hidden_layers

    return DecoderConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        rope=rope,
        qkv_bias=True if family == "qwen2" else (attention_bias and family != "mistral"),
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) and family == "llama",
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_windows=windows,
        hidden_act=hf.hidden_act,
    )
