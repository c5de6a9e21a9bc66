"""Base projections packed once for oneDNN on CPU (see `kernels.onednn` for why and by how much).

The packed weight replaces the dense one (inference only: no autograd, and the module's state
dict no longer holds the weight). A weight shared with the embedding (tied lm_head) stays, and
the projection gets its own packed copy.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import onednn
from kernels.onednn import can_pack

__all__ = ["PackedLinear", "can_pack", "pack_linears"]


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W reordered for oneDNN; `in_features`/`out_features` as nn.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = onednn.pack(weight)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype:
            raise ValueError(f"PackedLinear holds {self.packed.dtype} weights; got {x.dtype} input")
        return onednn.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, onednn"


def pack_linears(model: nn.Module) -> list[str]:
    """Replace every nn.Linear of `model` by a PackedLinear, in place; returns their paths.

    Objects that own a weight outside the module tree (molora_core.lora_layer.MoLoRAGroup) pack
    it through their own `pack()`: call that first. Nothing is packed where oneDNN is missing.
    """
    if not onednn.available():
        return []
    replaced = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not can_pack(module.weight):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, PackedLinear(module.weight, module.bias))
        replaced.append(path)
    return replaced
