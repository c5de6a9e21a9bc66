"""The gate router learns a per-token routing over frozen adapters."""

import pytest
import torch
from torch.nn import functional as F

from molora_core.errors import RouterInvalid
from molora_core.routing import GateRouter, RoutingPlan, VocabRouter
from molora_core.training import train_gate

VOCAB = 48
from tests.molora_core.helpers import linear_shapes, molora_model, random_adapter, tiny_causal_lm


def test_gate_learns_vocab_routing_with_adapters_frozen():
    """Teacher: tokens below VOCAB/2 use adapter 'low', the rest 'high'. The gate must find that rule.

    The vocabulary is smaller than the hidden size so that a linear gate over random embeddings
    can separate any labelling of it; one layer keeps the loss surface tame enough for a short run.
    """
    torch.manual_seed(0)
    model = tiny_causal_lm("qwen3", seed=3, vocab_size=VOCAB, num_hidden_layers=1)
    shapes = linear_shapes(model)
    model, hotset, context = molora_model(model, num_slots=2, max_rank=8)
    slot_of = {
        name: hotset.acquire(name, lambda n=name, s=seed: random_adapter(shapes, n, rank=8, seed=s, scale=1.0, std=0.15))
        for name, seed in (("low", 1), ("high", 2))
    }
    # Every batch holds each vocabulary id once, so the gate sees every token's embedding.
    batches = [torch.randperm(VOCAB).view(4, VOCAB // 4) for _ in range(4)]
    teacher = VocabRouter([(0, VOCAB // 2, slot_of["low"]), (VOCAB // 2, VOCAB, slot_of["high"])])
    teacher_logits = {}
    plan = RoutingPlan(VOCAB, 1, 2)
    with torch.no_grad():
        for ids in batches:
            plan.begin(ids.numel(), 1)
            plan.assign(0, teacher, ids.reshape(-1))
            context.meta = plan.finalize()
            teacher_logits[ids.data_ptr()] = model(ids).logits
    context.meta = None

    def distill(logits, ids):
        target = teacher_logits[ids.data_ptr()]
        return F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")

    gate = GateRouter(hidden_size=64, adapters=["low", "high"], top_k=2)
    frozen_before = {k: b.lora_a_stacked.clone() for k, b in hotset.buffers.items()}
    base_before = [p.detach().clone() for p in model.parameters()]
    losses = train_gate(model, gate, slot_of, context, hotset.num_slots, batches, steps=150, lr=5e-2, loss_fn=distill)

    final = sum(losses[-4:]) / 4  # one pass over the 4 batches
    assert final < 0.3 * losses[0], f"loss went {losses[0]:.4f} -> {final:.4f}"
    ids = torch.arange(VOCAB)
    index, weights = gate(model.get_input_embeddings()(ids))
    picked = index[:, 0]
    expected = (ids >= VOCAB // 2).long()  # gate.adapters = ["low", "high"]
    accuracy = (picked == expected).float().mean().item()
    assert accuracy >= 0.85, f"gate's top choice matches the rule for {accuracy:.0%} of the vocabulary"
    for key, buffers in hotset.buffers.items():
        assert torch.equal(buffers.lora_a_stacked, frozen_before[key]), "adapters must stay frozen"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base_before)), "base must stay frozen"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored afterwards"


def test_top1_gate_is_refused_for_training():
    model, hotset, context = molora_model(tiny_causal_lm("qwen3"), num_slots=2, max_rank=8)
    gate = GateRouter(hidden_size=64, adapters=["a", "b"], top_k=1)
    with pytest.raises(RouterInvalid, match="top_k=1 gets no gradient"):
        train_gate(model, gate, {"a": 0, "b": 1}, context, 2, [torch.zeros(1, 4, dtype=torch.long)], steps=1)
