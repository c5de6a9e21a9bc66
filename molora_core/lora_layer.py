"""The MoLoRA linear layer: a base projection plus the per-token LoRA delta of the step.

    y = base(x) + sum_k w[t,k] * scale[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T,  s = slot[t,k]

The delta goes through a backend (`kernels.get_backend`) over the step's dispatch metadata,
which every layer reads from one shared `LoRAContext`, so the plan is built once per step.

Projections that read the same input (q/k/v, gate/up) also get a `MoLoRAGroup`, which the
decoder calls instead of the members one by one: one base matmul over their concatenated
weights (the members' weights become views of it) and one LoRA call for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import DispatchMeta, LoRABackend
from molora_core.hotset import BufferGroup, HotSet, SlotBuffers
from molora_core.model.packed import PackedLinear, can_pack, pack_linears

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Sibling projections that read the same input, and the attribute of their parent module
# (Attention, MLP) that the decoder calls to run them together.
SHARED_INPUTS = {("q_proj", "k_proj", "v_proj"): "qkv_group", ("gate_proj", "up_proj"): "gate_up_group"}


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
        g, i = buffers.group, slice(buffers.index, buffers.index + 1)  # this module's row of its group
        # The backend's arguments for this module: views of the hot-set buffers, which stay at
        # their addresses (adapters load into them in place), so they are made once.
        self._lora_args = (g.lora_a[i], [buffers.lora_b_stacked], g.ranks[i], g.scales[i])
        self._rank_scales = g.rank_scales[i]
        self._backend_cache: dict = {}  # what the backend derives from these buffers (see apply_shared)

    @property
    def weight(self) -> torch.Tensor | None:
        return getattr(self.base, "weight", None)  # None once packed for oneDNN

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.context.meta
        if meta is None:
            return self.base(x)
        tokens, backend = _tokens(x, meta), self.context.backend
        weight, bias = _base_operands(self.base)
        if weight is not None:  # the backend may run the base with the LoRA
            y = backend.base_and_apply_shared(tokens, weight, bias, [self.out_features], *self._lora_args, meta,
                                              self._rank_scales, self._backend_cache)
            if y is not None:
                return _like_input(y, x)
        y = self.base(x)
        backend.apply_shared(tokens, *self._lora_args, meta, [y.view(-1, y.shape[-1])], self._rank_scales,
                             self._backend_cache)
        return y

    def extra_repr(self) -> str:
        slots = self.buffers.slot_ranks.numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={slots}"


def _base_operands(base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of a MoLoRALinear's base for `base_and_apply_shared`: dense, or packed for
    oneDNN; (None, None) for a group member's packed slice (the group runs it)."""
    if isinstance(base, PackedLinear):
        return base.packed, base.bias
    if isinstance(base, nn.Linear):
        return base.weight, base.bias
    return None, None


def _tokens(x: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the decoder's rows are [T, D] already
    if x2d.shape[0] != meta.num_tokens:
        raise ValueError(f"routing plan covers {meta.num_tokens} tokens but the layer got {x2d.shape[0]}")
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [T, D_out] shaped as x's leading dimensions: [..., D_out]."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], -1)


class MoLoRAGroup:
    """Sibling MoLoRALinear layers that read the same input, run as one.

    Calling it returns each member's output, as the members would: base outputs come from one
    matmul over the members' concatenated weights (after construction each member's weight
    and bias are views of these, so loading a state dict still reaches them), and the LoRA
    deltas from one backend call over the members' `BufferGroup`; `concat` returns the outputs
    side by side, as the matmul made them. A plain object, not an nn.Module, so the model's
    state dict does not list the weights twice.
    """

    def __init__(self, members: list[MoLoRALinear], group: BufferGroup, context: LoRAContext):
        if [m.buffers for m in members] != group.members:
            raise ValueError("a MoLoRAGroup's members must be its buffer group's modules, in order")
        biases = [m.base.bias for m in members]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("a MoLoRAGroup's members must all have a bias or all have none")
        self.members, self.group, self.context = members, group, context
        self.sizes = [m.out_features for m in members]
        self._lora_b = [m.buffers.lora_b_stacked for m in members]
        self._backend_cache: dict = {}  # what the backend derives from the group's buffers (see apply_shared)
        self.packed: PackedLinear | None = None  # set by pack() on CPU
        with torch.no_grad():
            self.weight = torch.cat([m.base.weight for m in members])  # [sum D_out, D_in]
            self.bias = None if biases[0] is None else torch.cat(biases)
            for i, (m, w) in enumerate(zip(members, self.weight.split(self.sizes))):
                m.base.weight = nn.Parameter(w, requires_grad=m.base.weight.requires_grad)
                if self.bias is not None:
                    m.base.bias = nn.Parameter(self.bias.split(self.sizes)[i], requires_grad=m.base.bias.requires_grad)

    def pack(self) -> bool:
        """Pack the concatenated weight for oneDNN (CPU); the dense weight is released and each
        member's base becomes a column slice of the packed projection. False if not packable."""
        if self.packed is not None:
            return True
        if not can_pack(self.weight):
            return False
        self.packed = PackedLinear(self.weight, self.bias)
        self.weight = self.bias = None
        start = 0
        for member, size in zip(self.members, self.sizes):
            member.base = _PackedSlice(self.packed, start, start + size)
            start += size
        return True

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """Base outputs of every member, concatenated: [..., sum D_out]."""
        return self.packed(x) if self.packed is not None else F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's output [..., D_out_g]: column slices of `concat(x)`."""
        return self.concat(x).split_with_sizes(self.sizes, -1)  # (Tensor.split: 2 us more a call)

    def concat(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, concatenated: [..., sum D_out]."""
        meta = self.context.meta
        if meta is None:
            return self.base(x)
        g, tokens, backend = self.group, _tokens(x, meta), self.context.backend
        lora = (g.lora_a, self._lora_b, g.ranks, g.scales, meta)
        weight, bias = (self.weight, self.bias) if self.packed is None else (self.packed.packed, self.packed.bias)
        # The backend may run the base with the LoRA (with a packed weight: the CPU backend).
        y = backend.base_and_apply_shared(tokens, weight, bias, self.sizes, *lora, g.rank_scales, self._backend_cache)
        if y is not None:
            return _like_input(y, x)
        y = self.base(x)
        outs = list(y.split_with_sizes(self.sizes, -1))  # the decoder's [T, D] rows need no reshaping (a few us a call)
        if y.dim() != 2:
            outs = [o.view(-1, o.shape[-1]) for o in outs]
        backend.apply_shared(tokens, *lora, outs, g.rank_scales, self._backend_cache)
        return y


class _PackedSlice(nn.Module):
    """A group member's base after packing: its columns of the group's packed projection (for
    callers that run the member alone; the decoder runs the group)."""

    def __init__(self, packed: PackedLinear, start: int, end: int):
        super().__init__()
        object.__setattr__(self, "_packed", packed)  # not a submodule: the group owns it
        self.start, self.end = start, end
        self.in_features, self.out_features = packed.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x)[..., self.start : self.end]


def groups_of(model: nn.Module) -> list[MoLoRAGroup]:
    """Every MoLoRAGroup that attach_molora installed on `model`."""
    found = []
    for module in model.modules():
        for attribute in SHARED_INPUTS.values():
            group = getattr(module, attribute, None)
            if isinstance(group, MoLoRAGroup):
                found.append(group)
    return found


def pack_for_cpu(model: nn.Module) -> int:
    """Pack the base projections of a CPU model for oneDNN (molora_core.model.packed): each
    MoLoRAGroup's concatenated weight, then every remaining nn.Linear. Returns how many
    projections now run packed (0 where oneDNN is unavailable)."""
    groups = sum(group.pack() for group in groups_of(model))
    return groups + len(pack_linears(model))


def attach_molora(model: nn.Module, hotset: HotSet, context: LoRAContext) -> list[str]:
    """Replace every nn.Linear that `hotset` has buffers for by a MoLoRALinear, in place, and
    give each parent whose SHARED_INPUTS siblings form one hot-set buffer group a MoLoRAGroup.

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
    for group in hotset.groups:
        paths = [path for path, buffers in hotset.buffers.items() if buffers.group is group]
        parent_path = paths[0].rpartition(".")[0]
        names = tuple(path.rpartition(".")[2] for path in paths)
        attribute = SHARED_INPUTS.get(names)
        if attribute is None or {p.rpartition(".")[0] for p in paths} != {parent_path}:
            continue  # grouped by the caller for another layout; members still run one by one
        parent = model.get_submodule(parent_path) if parent_path else model
        members = [getattr(parent, name) for name in names]
        setattr(parent, attribute, MoLoRAGroup(members, group, context))
    return replaced
