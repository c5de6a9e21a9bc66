"""Differential tests of the MoLoRA layer against PEFT, merged weights and single-adapter runs."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from kernels import build_dispatch, get_backend
from molora_core.hotset import HotSet
from molora_core.lora_layer import TARGET_MODULES, LoRAContext, MoLoRALinear
from molora_core.peft_io import load_peft_adapter, save_peft_adapter
from molora_core.routing import RoutingPlan, SequenceRouter
from tests.molora_core.helpers import VOCAB, linear_shapes, molora_model, random_adapter, tiny_causal_lm

FAMILIES = ["qwen3", "llama"]


def _peft_adapter_dir(base, tmp_path, name, seed, **lora_kwargs):
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=list(TARGET_MODULES), init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    path = tmp_path / name
    peft_model.save_pretrained(str(path))
    return path


def _route_sequences(plan, slots_per_seq, seq_len):
    plan.begin(len(slots_per_seq) * seq_len, 1)
    for i, slot in enumerate(slots_per_seq):
        router = None if slot < 0 else SequenceRouter(slot)
        plan.assign(i * seq_len, router, torch.zeros(seq_len, dtype=torch.long))
    return plan.finalize()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(r=8, lora_alpha=16),
        dict(r=8, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32}),
    ],
    ids=["plain", "rslora-patterns"],
)
def test_single_adapter_matches_peft(family, lora_kwargs, tmp_path):
    base = tiny_causal_lm(family)
    path = _peft_adapter_dir(base, tmp_path, "a", seed=1, **lora_kwargs)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    model, hotset, context = molora_model(copy.deepcopy(base))
    slot = hotset.acquire("a", lambda: load_peft_adapter(path))
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    context.meta = _route_sequences(RoutingPlan(64, 1, hotset.num_slots), [slot, slot], 12)
    with torch.no_grad():
        ours = model(input_ids).logits
        expected = reference(input_ids).logits
        base_logits = base(input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-2, "adapter must change the logits for the test to mean anything"
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft_adapter_names(family, tmp_path):
    """One sequence per adapter (and one on the base model) in one batch, as PEFT's adapter_names."""
    base = tiny_causal_lm(family)
    paths = {name: _peft_adapter_dir(base, tmp_path, name, seed=i + 3, r=4 * (i + 1), lora_alpha=8) for i, name in enumerate("abc")}
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a"]), adapter_name="a").eval()
    for name in "bc":
        reference.load_adapter(str(paths[name]), adapter_name=name)
    model, hotset, context = molora_model(copy.deepcopy(base))
    slots = {name: hotset.acquire(name, lambda p=paths[name]: load_peft_adapter(p)) for name in "abc"}
    order = ["c", "__base__", "a", "b"]
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5))
    context.meta = _route_sequences(RoutingPlan(64, 1, hotset.num_slots), [slots.get(n, -1) for n in order], 9)
    with torch.no_grad():
        ours = model(input_ids).logits
        expected = reference(input_ids, adapter_names=order).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_adapter_equals_merged_weights(family):
    base = tiny_causal_lm(family)
    adapter = random_adapter(linear_shapes(base), "m", rank=8, seed=7)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for path, module in adapter.modules.items():
            merged.get_submodule(path).weight += module.scale * module.lora_b @ module.lora_a
    model, hotset, context = molora_model(copy.deepcopy(base))
    slot = hotset.acquire("m", lambda: adapter)
    input_ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(8))
    context.meta = _route_sequences(RoutingPlan(64, 1, hotset.num_slots), [slot] * 3, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, merged(input_ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_tokens", [5, 300])  # decode and prefill paths
@pytest.mark.parametrize("top_k", [1, 2])
def test_per_token_mixed_layer_equals_weighted_single_runs(num_tokens, top_k):
    """A different adapter per token (and top-2 weights) equals the weighted sum of single-adapter runs."""
    gen = torch.Generator().manual_seed(11)
    base_linear = torch.nn.Linear(48, 40)
    shapes = {"layer": (48, 40)}
    hotset = HotSet(shapes, num_slots=4, max_rank=16)
    adapters = [random_adapter(shapes, f"a{i}", rank=r, seed=20 + i) for i, r in enumerate([4, 16, 8])]
    slots = [hotset.acquire(a.name, lambda a=a: a) for a in adapters]
    layer = MoLoRALinear(base_linear, hotset.buffers["layer"], LoRAContext(get_backend("torch")))
    x = torch.randn(num_tokens, 48, generator=gen)
    choice = torch.stack([torch.randperm(3, generator=gen)[:top_k] for _ in range(num_tokens)])  # adapter ids
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1)
    slot_table = torch.tensor(slots, dtype=torch.int32)
    layer.context.meta = build_dispatch(slot_table[choice], weights, hotset.num_slots)
    with torch.no_grad():
        ours = layer(x)
        singles = []
        for s in slots:
            layer.context.meta = build_dispatch(torch.full((num_tokens, 1), s, dtype=torch.int32), torch.ones(num_tokens, 1), 4)
            singles.append(layer(x))
    singles = torch.stack(singles)  # [3, T, D_out]
    expected = sum(weights[:, k : k + 1] * singles[choice[:, k], torch.arange(num_tokens)] for k in range(top_k))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_save_peft_adapter_round_trips_through_peft(tmp_path):
    """Our writer's files are read by PEFT itself to the same logits."""
    base = tiny_causal_lm("qwen3")
    shapes = linear_shapes(base)
    adapter = random_adapter(shapes, "w", rank=8, seed=4)
    # Mixed ranks and scales per module exercise rank_pattern / alpha_pattern.
    first = next(iter(shapes))
    adapter.modules[first] = random_adapter({first: shapes[first]}, "x", rank=4, seed=5, scale=0.5).modules[first]
    path = save_peft_adapter(adapter, tmp_path / "w", lora_alpha=16)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    model, hotset, context = molora_model(copy.deepcopy(base))
    slot = hotset.acquire("w", lambda: load_peft_adapter(path))
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    context.meta = _route_sequences(RoutingPlan(16, 1, hotset.num_slots), [slot], 8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=0)
