"""Rotary position embedding with the scaling variants the Llama / Mistral / Qwen configs use.

The inverse-frequency math follows transformers' `modeling_rope_utils.py` line for line (same
float32 ops in the same order), so cos/sin match bit-for-bit and logits match to fp32 rounding.

Dynamic NTK: transformers recomputes the frequencies from `seq_len = max(position_ids) + 1` of
the call. Here `seq_len` is each token's own sequence length after the step (its context
length), which equals transformers' value for a batch of one sequence, prefill or decode, and
does not let one long sequence change the rotation of the others in a continuous batch.

Legend: T tokens, H heads, D_h head dim, F = D_h / 2 frequencies.
"""

from __future__ import annotations

import math

import torch

from molora_core.model.config import DecoderConfig


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor = rope["factor"]
    low_freq_factor = rope["low_freq_factor"]
    high_freq_factor = rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn(base: float, dim: int, rope: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    factor = rope.get("factor")
    original = rope["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for a step's positions. A plain object, not an nn.Module: its fp32
    frequencies must not follow `model.to(dtype)`, and it has nothing to load."""

    def __init__(self, cfg: DecoderConfig):
        rope = cfg.rope
        self.rope_type = rope.get("rope_type", "default")
        self.base = float(rope["rope_theta"])
        self.dim = cfg.head_dim
        self.max_position_embeddings = cfg.max_position_embeddings
        self.factor = float(rope.get("factor", 1.0) or 1.0)
        self.attention_scaling = 1.0
        inv_freq = _base_inv_freq(self.base, self.dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, rope)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn(self.base, self.dim, rope, cfg.max_position_embeddings)
        self.inv_freq = inv_freq  # float32[F], on CPU; copies per device in _on
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def _on(self, device: torch.device) -> torch.Tensor:
        if device not in self._per_device:
            self._per_device[device] = self.inv_freq.to(device)
        return self._per_device[device]

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """float32[T, F] frequencies for tokens whose sequences have `seq_lens` (int64[T]) tokens."""
        seq_len = torch.clamp(seq_lens, min=self.max_position_embeddings)
        factor, dim = self.factor, self.dim
        base = self.base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_lens.device).float() / dim
        return 1.0 / (base[:, None] ** exponents[None, :])

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each [T, D_h] in `dtype`, for int64[T] `positions`; sin's first
        half is negated (rotate-half's sign, folded in once per step for `apply_rope`).

        `seq_lens` (int64[T], each token's sequence length after this step) is read only by the
        dynamic rope type.
        """
        if self.rope_type == "dynamic":
            assert seq_lens is not None, "dynamic rope needs per-token sequence lengths"
            inv_freq = self._dynamic_inv_freq(seq_lens)
        else:
            inv_freq = self._on(positions.device)[None, :]
        freqs = positions[:, None].float() * inv_freq  # [T, F]
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D_h] by (cos, sin) from `cos_sin` (the half-split layout of HF checkpoints).

    transformers computes x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]; here
    the sign sits in sin, so rotate_half becomes a roll, [x2, x1]: the same products, rounded the
    same way, in four ops instead of six."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None, :]
