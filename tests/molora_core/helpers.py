"""Tiny models and random adapters shared by the molora_core tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kernels import get_backend
from molora_core.adapter import LoRAAdapter, LoRAModule
from molora_core.hotset import HotSet
from molora_core.lora_layer import SHARED_INPUTS, TARGET_MODULES, LoRAContext, attach_molora

VOCAB = 128


def tiny_causal_lm(family: str = "qwen3", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    common.update(overrides)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(family)
    return model.eval()


def linear_shapes(model: torch.nn.Module, targets=TARGET_MODULES) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def random_adapter(
    shapes: dict[str, tuple[int, int]], name: str, rank: int, seed: int, scale: float = 2.0, std: float = 0.1
) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        path: LoRAModule(
            torch.randn(rank, d_in, generator=gen) * std,
            torch.randn(d_out, rank, generator=gen) * std,
            scale,
        )
        for path, (d_in, d_out) in shapes.items()
    }
    return LoRAAdapter(name, modules)


def molora_model(model, num_slots=4, max_rank=16, backend="torch", targets=TARGET_MODULES, grouped=True,
                 dtype=torch.float32):
    """(model with MoLoRA layers, hot-set, context), laid out as the engine lays it out: q/k/v
    and gate/up in buffer groups, lora_b as the backend wants it (grouped=False: one module at
    a time, slot-major)."""
    backend = get_backend(backend)
    layout = dict(shared_inputs=tuple(SHARED_INPUTS), b_layout=backend.b_layout) if grouped else {}
    hotset = HotSet.for_model(model, targets, num_slots, max_rank, dtype=dtype, **layout)
    context = LoRAContext(backend)
    attach_molora(model, hotset, context)
    return model, hotset, context
