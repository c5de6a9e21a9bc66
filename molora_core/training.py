"""Training of a MoLoRA gate router over frozen adapters.

The adapters sit in the hot-set (plain buffers, never parameters) and the base model is frozen;
only the gate's weights receive gradients, through the per-token mixing weights of the plan
(softmax over the chosen logits, so top_k must be >= 2 for the gate to learn).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from molora_core.errors import RouterInvalid
from molora_core.lora_layer import LoRAContext
from molora_core.routing.gate import GateRouter
from molora_core.routing.plan import RoutingPlan
from molora_core.routing.routers import GateSlotRouter


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def train_gate(
    model: nn.Module,
    gate: GateRouter,
    slot_of: Mapping[str, int],
    context: LoRAContext,
    num_slots: int,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-2,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    embedding: nn.Module | None = None,
) -> list[float]:
    """Fit `gate` for `steps` steps on `batches` (long[B, L] each, cycled); returns the losses.

    Args:
        model: a model whose target linears are MoLoRALinear layers reading `context`.
        slot_of: hot-set slot of each of the gate's adapters (they must be resident).
        forward: input_ids -> logits [B, L, V]; defaults to `model(ids).logits`.
        embedding: module whose output the gate reads; defaults to model.get_input_embeddings().
    """
    if gate.top_k < 2:
        raise RouterInvalid("a gate with top_k=1 gets no gradient (softmax over one logit is 1); use top_k >= 2")
    router = GateSlotRouter(gate, [slot_of[name] for name in gate.adapters])
    forward = forward or (lambda ids: model(ids).logits)
    embedding = embedding or model.get_input_embeddings()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    gate.train()
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    plan: RoutingPlan | None = None

    def route_on_embeddings(module, inputs, output):
        context.meta = plan.finalize(output.reshape(-1, output.shape[-1]))

    hook = embedding.register_forward_hook(route_on_embeddings)
    losses = []
    try:
        for input_ids in itertools.islice(itertools.cycle(batches), steps):
            num_tokens = input_ids.numel()
            plan = RoutingPlan(num_tokens, gate.top_k, num_slots, device=input_ids.device, preallocated=False)
            plan.begin(num_tokens, gate.top_k)
            plan.assign(0, router, input_ids.reshape(-1))
            loss = loss_fn(forward(input_ids), input_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        hook.remove()
        context.meta = None
        for p in frozen:
            p.requires_grad_(True)
        gate.eval()
    return losses
