"""The MoLoRA learned router: a gate over the hidden state picks top-k of its adapter set.

logits = W @ rms_normalize(h) + b over the router's ordered adapters; the top-k logits are kept
and softmax-normalised into mixing weights (MoLoRA, Shah & Wagle 2026, arXiv 2603.15965). The
gate reads the embedding output, so one routing plan serves every layer of the step. It trains
with the adapters frozen (`molora_core.training.train_gate`).

Saved as `router.safetensors` (gate.weight [A, D], gate.bias [A]) plus `router.json`, which lists
its adapters in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kernels import decode_cpu
from molora_core.errors import RouterInvalid

CONFIG_NAME = "router.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT_VERSION = 1


class GateRouter(nn.Module):
    """Per-token top-k gate over an ordered adapter set. A adapters, D hidden size."""

    def __init__(self, hidden_size: int, adapters: list[str], top_k: int = 2, eps: float = 1e-6):
        super().__init__()
        if len(adapters) < 1 or len(set(adapters)) != len(adapters):
            raise RouterInvalid(f"a gate router needs distinct adapter names; got {adapters}")
        if not 1 <= top_k <= len(adapters):
            raise RouterInvalid(f"top_k must be in [1, {len(adapters)}] for {len(adapters)} adapters; got {top_k}")
        self.hidden_size, self.adapters, self.top_k, self.eps = hidden_size, list(adapters), top_k, eps
        self.gate = nn.Linear(hidden_size, len(adapters), bias=True)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("_unit", torch.ones(hidden_size), persistent=False)  # the compiled norm's weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] -> float32 logits [T, A]."""
        h = hidden.float()
        if decode_cpu.enabled(h):  # CPU, no autograd: one compiled call (2 us against torch's 19 at 16 x 256)
            h = decode_cpu.rms_norm(h.contiguous(), self._unit.float(), self.eps)[0]
        else:
            h = F.rms_norm(h, (h.shape[-1],), None, self.eps)  # h * rsqrt(mean(h^2) + eps), one op
        return self.gate(h.to(self.gate.weight.dtype)).float()

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, D] -> (indices long[T, k] into `adapters`, weights float32[T, k] summing to 1)."""
        # A stable sort, not topk (whose order of ties is unspecified): ties go to the lower
        # adapter index and NaN comes first, as in the compiled route (decode_cpu.gate_route).
        top, index = self.logits(hidden).sort(dim=-1, descending=True, stable=True)
        top, index = top[:, : self.top_k], index[:, : self.top_k]
        return index, torch.softmax(top, dim=-1)

    def route_slots(self, hidden: torch.Tensor, lookup: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with each chosen adapter mapped to its hot-set slot: hidden [T, D], lookup
        int32[A] (adapter index -> slot) -> (slots int32[T, k], weights float32[T, k]). With `out`
        (int32 and float32 [T, >= k], e.g. rows of a routing plan) the routes are written into its
        first k columns, which are returned. On CPU without autograd one compiled call
        (`decode_cpu.gate_route`) for forward's ten-odd ops and the writes."""
        weight, bias = self.gate.weight, self.gate.bias
        if (decode_cpu.enabled(hidden) and hidden.stride(-1) == 1 and weight.dtype == bias.dtype == torch.float32
                and lookup.device.type == "cpu" and (out is None or out[0].device.type == "cpu")):
            return decode_cpu.gate_route(hidden, weight, bias, self.eps, self.top_k, lookup, out)
        index, weights = self(hidden)
        slots = lookup.to(index.device)[index]
        if out is None:
            return slots, weights
        k = self.top_k
        out[0][:, :k] = slots
        out[1][:, :k] = weights
        return out[0][:, :k], out[1][:, :k]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"gate.weight": self.gate.weight.detach().float().contiguous(), "gate.bias": self.gate.bias.detach().float()},
            str(path / WEIGHTS_NAME),
        )
        config = {
            "kind": "gate",
            "format_version": FORMAT_VERSION,
            "adapters": self.adapters,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "input": "embedding",
            "normalize": "rms",
        }
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "GateRouter":
        path = Path(path)
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except FileNotFoundError:
            raise RouterInvalid(f"{path} is not a router directory: {CONFIG_NAME} is missing") from None
        except json.JSONDecodeError as exc:
            raise RouterInvalid(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from None
        if config.get("kind") != "gate":
            raise RouterInvalid(f"{path / CONFIG_NAME}: kind {config.get('kind')!r} is not a gate router")
        if not (path / WEIGHTS_NAME).is_file():
            raise RouterInvalid(f"{path}: {WEIGHTS_NAME} is missing")
        router = cls(int(config["hidden_size"]), list(config["adapters"]), int(config.get("top_k", 2)))
        tensors = load_file(str(path / WEIGHTS_NAME))
        expected = {"gate.weight": (len(router.adapters), router.hidden_size), "gate.bias": (len(router.adapters),)}
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise RouterInvalid(f"{path / WEIGHTS_NAME}: {key} is {got}; expected {shape}")
            if not torch.isfinite(tensors[key]).all():
                raise RouterInvalid(f"{path / WEIGHTS_NAME}: {key} holds NaN or Inf values")
        router.load_state_dict(tensors)
        return router.to(device)
