"""A LoRA adapter's weights in host memory, as the hot-set copies them into slots.

Legend: R rank, D_in / D_out features of the target module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoRAModule:
    """One target module's low-rank update: delta(x) = scale * (x @ lora_a.T) @ lora_b.T."""

    lora_a: torch.Tensor  # [R, D_in]
    lora_b: torch.Tensor  # [D_out, R]
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoRAAdapter:
    """An adapter's per-module weights, keyed by full module path (`model.layers.0.self_attn.q_proj`)."""

    name: str
    modules: dict[str, LoRAModule]
    meta: dict = field(default_factory=dict)  # config values kept for reporting (alpha, rslora, ...)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})
