"""The MoLoRA linear layer: a base projection plus the per-token LoRA delta of the step.

    y = base(x) + sum_k w[t,k] * scale[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T,  s = slot[t,k]

The delta goes through a backend (`kernels.get_backend`) over the step's dispatch metadata,
which every layer reads from one shared `LoRAContext`, so the plan is built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import DispatchMeta, LoRABackend
from molora_core.hotset import HotSet, SlotBuffers

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAContext:
    """What every MoLoRA layer of one model reads in a step. meta None = base model only."""

    backend: LoRABackend
    meta: DispatchMeta | None = None


class MoLoRALinear(nn.Module):
    """nn.Linear plus the per-token LoRA delta of its hot-set buffers."""

    def __init__(self, base: nn.Linear, buffers: SlotBuffers, context: LoRAContext):
        super().__init__()
        if (base.in_features, base.out_features) != (buffers.d_in, buffers.d_out):
            raise ValueError(
                f"hot-set buffers are {buffers.d_in}->{buffers.d_out}; base linear is "
                f"{base.in_features}->{base.out_features}"
            )
        self.base = base
        self.buffers = buffers
        self.context = context

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        meta = self.context.meta
        if meta is None:
            return y
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] != meta.num_tokens:
            raise ValueError(
                f"routing plan covers {meta.num_tokens} tokens but the layer got {x2d.shape[0]}"
            )
        buffers = self.buffers
        self.context.backend.apply(
            x2d.contiguous(),
            buffers.lora_a_stacked,
            buffers.lora_b_stacked,
            buffers.slot_ranks,
            buffers.slot_scales,
            meta,
            y.view(-1, y.shape[-1]),
        )
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.buffers.slot_ranks.numel()}"


def attach_molora(model: nn.Module, hotset: HotSet, context: LoRAContext) -> list[str]:
    """Replace every nn.Linear that `hotset` has buffers for by a MoLoRALinear, in place.

    Returns the module paths replaced. Raises ValueError if a hot-set module is not an
    nn.Linear of `model`.
    """
    replaced = []
    for path, buffers in hotset.buffers.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child, None)
        if isinstance(base, MoLoRALinear):
            base = base.base
        if not isinstance(base, nn.Linear):
            raise ValueError(f"hot-set module {path!r} is not an nn.Linear of the model (found {type(base).__name__})")
        setattr(parent, child, MoLoRALinear(base, buffers, context))
        replaced.append(path)
    return replaced
