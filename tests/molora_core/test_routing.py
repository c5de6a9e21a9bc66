"""Routers, specs, the routing plan and the gate router's artifact format."""

import json

import pytest
import torch

from molora_core.errors import RouterInvalid
from molora_core.routing import (
    AdapterSpec,
    BaseSpec,
    GateRouter,
    GateSpec,
    MixtureSpec,
    RoutingPlan,
    SequenceRouter,
    VocabRouter,
    VocabSpec,
)

SLOT_OF = {"code": 2, "math": 0, "image": 3}


def test_sequence_and_mixture_routers_fill_only_their_rows():
    plan = RoutingPlan(max_tokens=16, max_k=4, num_slots=4)
    plan.begin(num_tokens=7, top_k=2)
    plan.assign(0, AdapterSpec("code").bind(SLOT_OF), torch.arange(3))
    plan.assign(3, BaseSpec().bind(SLOT_OF), torch.arange(2))
    plan.assign(5, MixtureSpec(("math", "code"), (0.25, 0.75)).bind(SLOT_OF), torch.arange(2))
    meta = plan.finalize()
    assert plan.slots.tolist() == [[2, -1]] * 3 + [[-1, -1]] * 2 + [[0, 2]] * 2
    assert plan.weights.tolist() == [[1, 0]] * 3 + [[0, 0]] * 2 + [[0.25, 0.75]] * 2
    assert meta.slot_counts.tolist() == [2, 0, 5, 0]
    # Every route constant: sorted and counted on the host, nothing left to read back.
    assert meta.host_route == (plan.slots.reshape(-1).tolist(), plan.weights.reshape(-1).tolist())
    assert meta.host_counts() == [2, 0, 5, 0] and meta.sorted_pairs.tolist()[:2] == [10, 12]


def test_vocab_router_maps_id_ranges_and_default():
    spec = VocabSpec(ranges=((100, 200, "image"), (0, 50, "code")), default="math")
    router = spec.bind(SLOT_OF)
    slots, weights = router.route(torch.tensor([0, 49, 50, 99, 100, 199, 200]))
    assert slots.squeeze(1).tolist() == [2, 2, 0, 0, 3, 3, 0]
    assert weights.squeeze(1).tolist() == [1.0] * 7
    base_default, w = VocabRouter([(10, 20, 1)]).route(torch.tensor([5, 15]))
    assert base_default.squeeze(1).tolist() == [-1, 1] and w.squeeze(1).tolist() == [0.0, 1.0]
    assert spec.adapter_names() == ["image", "code", "math"]


@pytest.mark.parametrize("ranges, match", [([(0, 10, 1), (5, 20, 2)], "overlap"), ([(10, 10, 1)], "empty")])
def test_vocab_router_rejects_bad_ranges(ranges, match):
    with pytest.raises(RouterInvalid, match=match):
        VocabRouter(ranges)


def test_specs_name_their_adapters_and_refuse_unbound_ones():
    assert MixtureSpec(("a", "b"), (0.5, 0.5)).adapter_names() == ["a", "b"]
    with pytest.raises(RouterInvalid, match="'nope' has no hot-set slot"):
        AdapterSpec("nope").bind(SLOT_OF)
    with pytest.raises(RouterInvalid, match="one weight per adapter"):
        MixtureSpec(("a", "b"), (1.0,))
    with pytest.raises(RouterInvalid, match="names an adapter twice"):
        MixtureSpec(("a", "a"), (0.5, 0.5))


def test_gate_rows_wait_for_hidden_state():
    torch.manual_seed(0)
    gate = GateRouter(hidden_size=8, adapters=["math", "code", "image"], top_k=2)
    plan = RoutingPlan(max_tokens=8, max_k=2, num_slots=4)
    plan.begin(num_tokens=5, top_k=2)
    plan.assign(0, AdapterSpec("math").bind(SLOT_OF), torch.arange(2))
    plan.assign(2, GateSpec(gate).bind(SLOT_OF), torch.arange(3))
    assert plan.needs_hidden
    with pytest.raises(ValueError, match="needs the step's hidden state"):
        plan.finalize()
    hidden = torch.randn(5, 8)
    meta = plan.finalize(hidden)
    index, weights = gate(hidden[2:])
    lookup = torch.tensor([0, 2, 3])
    assert plan.slots[2:].tolist() == lookup[index].tolist()
    torch.testing.assert_close(plan.weights[2:], weights)
    torch.testing.assert_close(plan.weights[2:].sum(-1), torch.ones(3))
    assert int(meta.slot_counts.sum()) == 2 + 3 * 2


def test_plan_rejects_steps_and_rows_that_do_not_fit():
    plan = RoutingPlan(max_tokens=4, max_k=2, num_slots=2)
    with pytest.raises(ValueError, match="does not fit"):
        plan.begin(5, 1)
    plan.begin(4, 1)
    with pytest.raises(ValueError, match="outside the step"):
        plan.assign(3, SequenceRouter(0), torch.arange(2))
    with pytest.raises(ValueError, match="K=1"):
        plan.assign(0, MixtureSpec(("math", "code"), (0.5, 0.5)).bind(SLOT_OF), torch.arange(2))


def test_plan_buffers_keep_their_addresses_across_steps():
    plan = RoutingPlan(max_tokens=32, max_k=2, num_slots=4)
    ptrs = None
    for step, num_tokens in enumerate([32, 3, 17]):
        plan.begin(num_tokens, 2)
        plan.assign(0, SequenceRouter(step % 4), torch.arange(num_tokens))
        meta = plan.finalize()
        now = [meta.slots.data_ptr(), meta.sorted_pairs.data_ptr(), meta.slot_counts.data_ptr(), meta.slot_offsets.data_ptr()]
        assert ptrs is None or now == ptrs
        ptrs = now


def test_gate_router_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    gate = GateRouter(hidden_size=16, adapters=["math", "code", "image"], top_k=2)
    with torch.no_grad():
        gate.gate.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    path = gate.save(tmp_path / "router")
    config = json.loads((path / "router.json").read_text())
    assert config["adapters"] == ["math", "code", "image"] and config["kind"] == "gate" and config["top_k"] == 2
    loaded = GateRouter.load(path)
    hidden = torch.randn(6, 16)
    for a, b in zip(gate(hidden), loaded(hidden)):
        torch.testing.assert_close(a, b)


def test_gate_router_load_errors(tmp_path):
    with pytest.raises(RouterInvalid, match="router.json is missing"):
        GateRouter.load(tmp_path)
    path = GateRouter(8, ["a", "b"]).save(tmp_path / "r")
    config = json.loads((path / "router.json").read_text())
    config["hidden_size"] = 9
    (path / "router.json").write_text(json.dumps(config))
    with pytest.raises(RouterInvalid, match=r"gate.weight is \(2, 8\); expected \(2, 9\)"):
        GateRouter.load(path)
    with pytest.raises(RouterInvalid, match="distinct adapter names"):
        GateRouter(8, ["a", "a"])
    with pytest.raises(RouterInvalid, match="top_k"):
        GateRouter(8, ["a"], top_k=2)


def test_requests_sharing_a_router_are_routed_in_one_call(monkeypatch):
    """Interleaved requests on one gate (and on one vocab router) are routed in one call per
    router, to the same rows, slots and weights as routing each request alone."""
    torch.manual_seed(1)
    gate = GateRouter(hidden_size=8, adapters=["math", "code"], top_k=2)
    other_gate = GateRouter(hidden_size=8, adapters=["code", "image"], top_k=2)
    vocab = VocabSpec(((0, 50, "code"),), default="math")
    hidden, ids = torch.randn(14, 8), torch.randint(0, 100, (14,))
    spans = [(0, 3, GateSpec(gate)), (3, 5, AdapterSpec("code")), (5, 9, GateSpec(gate)),
             (9, 11, vocab), (11, 13, GateSpec(other_gate)), (13, 14, vocab)]
    calls = []
    real_route = GateRouter.route_slots
    monkeypatch.setattr(GateRouter, "route_slots",
                        lambda self, h, lookup, out=None: calls.append(h.shape[0]) or real_route(self, h, lookup, out))

    plan = RoutingPlan(max_tokens=16, max_k=2, num_slots=4)
    plan.begin(14, 2)
    for start, end, spec in spans:
        plan.assign(start, spec.bind(SLOT_OF), ids[start:end])
    meta = plan.finalize(hidden)
    assert meta.host_route is None  # gate routes live on the device
    batched = plan.slots.clone(), plan.weights.clone()
    assert sorted(calls) == [2, 7]  # one call per gate, over all of its tokens

    alone_slots, alone_weights = torch.full((14, 2), -1, dtype=torch.int32), torch.zeros(14, 2)
    for start, end, spec in spans:
        one = RoutingPlan(max_tokens=16, max_k=2, num_slots=4)
        one.begin(end - start, 2)
        one.assign(0, spec.bind(SLOT_OF), ids[start:end])
        one.finalize(hidden[start:end])
        alone_slots[start:end], alone_weights[start:end] = one.slots, one.weights
    assert torch.equal(batched[0], alone_slots)
    torch.testing.assert_close(batched[1], alone_weights)


def test_adjacent_requests_on_one_gate_route_over_a_view():
    """Requests on one gate scheduled next to each other are routed in one call over the rows'
    slice, to the same slots and weights as routing each alone."""
    torch.manual_seed(2)
    gate = GateRouter(hidden_size=8, adapters=["math", "code", "image"], top_k=2)
    hidden, ids = torch.randn(9, 8), torch.randint(0, 100, (9,))
    spans = [(0, 2, AdapterSpec("code")), (2, 5, GateSpec(gate)), (5, 6, GateSpec(gate)), (6, 9, GateSpec(gate))]
    seen = []
    real_route = GateRouter.route_slots
    plan = RoutingPlan(max_tokens=16, max_k=2, num_slots=4)
    plan.begin(9, 2)
    for start, end, spec in spans:
        plan.assign(start, spec.bind(SLOT_OF), ids[start:end])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GateRouter, "route_slots", lambda self, h, lookup, out=None: seen.append(h) or real_route(self, h, lookup, out))
        plan.finalize(hidden)
    assert len(seen) == 1 and seen[0].data_ptr() == hidden[2:].data_ptr() and seen[0].shape[0] == 7
    index, weights = gate(hidden[2:])
    assert plan.slots[2:].tolist() == [[SLOT_OF[gate.adapters[i]] for i in row] for row in index.tolist()]
    torch.testing.assert_close(plan.weights[2:], weights)
    assert plan.slots[:2].tolist() == [[2, -1]] * 2


def test_route_static_matches_finalize():
    """The fixed-shape decode step's routing (device ops only, over buffers): gate rows routed
    from the hidden state, the other rows as resolved from the host, padding rows on no adapter;
    the dispatch metadata equals finalize's."""
    torch.manual_seed(4)
    gate = GateRouter(hidden_size=8, adapters=["math", "code", "image"], top_k=2)
    hidden, ids = torch.randn(8, 8), torch.randint(0, 100, (8,))
    bound = GateSpec(gate).bind(SLOT_OF)
    rows = [(0, AdapterSpec("code")), (1, bound), (2, VocabSpec(((0, 50, "code"),), default="math")),
            (3, bound), (4, MixtureSpec(("math", "image"), (0.5, 0.5))), (5, bound)]  # rows 6, 7: padding

    want_plan = RoutingPlan(max_tokens=8, max_k=4, num_slots=4)
    want_plan.begin(8, 4)
    for row, spec in rows:
        want_plan.assign(row, spec.bind(SLOT_OF) if spec is not bound else bound, ids[row : row + 1])
    want = want_plan.finalize(hidden)

    plan = RoutingPlan(max_tokens=8, max_k=4, num_slots=4)
    plan.begin(8, 4)
    flagged = torch.zeros(8, dtype=torch.bool)
    for row, spec in rows:
        if spec is bound:
            flagged[row] = True
        else:
            plan.assign(row, spec.bind(SLOT_OF), ids[row : row + 1])
    plan.resolve()
    got = plan.route_static(hidden, gate, bound.lookup, flagged)
    assert torch.equal(plan.slots, want_plan.slots)
    torch.testing.assert_close(plan.weights, want_plan.weights)
    for field in ("slots", "sorted_pairs", "slot_counts", "slot_offsets"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.host_counts() == want.host_counts() and got.host_route is None


def test_a_step_assigns_adjacent_requests_on_alike_routers_as_one_run(monkeypatch):
    """The engine's step hands the plan one run of rows per group of adjacent requests whose
    routers route alike (one gate, one adapter, one vocab spec), and the routes equal those of
    assigning each request alone."""
    from types import SimpleNamespace

    from molora_core.engine.step import StepRunner
    from molora_core.lora_layer import LoRAContext
    from molora_core.model import StepBatch

    torch.manual_seed(5)
    gate = GateRouter(hidden_size=8, adapters=["math", "code", "image"], top_k=2)
    vocab = VocabSpec(((0, 50, "code"),), default="math")
    requests = [(GateSpec(gate), 2), (GateSpec(gate), 1), (GateSpec(gate), 3), (AdapterSpec("code"), 1),
                (AdapterSpec("code"), 1), (AdapterSpec("math"), 2), (BaseSpec(), 1), (GateSpec(gate), 1),
                (vocab, 2), (vocab, 2)]
    entries = [(SimpleNamespace(router=spec.bind(SLOT_OF), kv_slot=i, num_computed=0), n)
               for i, (spec, n) in enumerate(requests)]
    lengths = [n for _, n in requests]
    batch = StepBatch.build(range(len(lengths)), lengths, lengths)
    hidden, ids = torch.randn(16, 8), torch.randint(0, 100, (16,))
    runs = []
    real_assign = RoutingPlan.assign
    monkeypatch.setattr(RoutingPlan, "assign", lambda self, start, router, token_ids: runs.append(
        (start, token_ids.shape[0])) or real_assign(self, start, router, token_ids))
    runner = StepRunner(None, None, RoutingPlan(max_tokens=16, max_k=2, num_slots=4), LoRAContext(backend=None),
                        None, max_top_k=2)
    runner._route(entries, ids, batch)(hidden)
    assert runs == [(0, 6), (6, 2), (8, 2), (10, 1), (11, 1), (12, 4)]
    monkeypatch.setattr(RoutingPlan, "assign", real_assign)

    alone = RoutingPlan(max_tokens=16, max_k=2, num_slots=4)
    alone.begin(16, 2)
    for (seq, n), start in zip(entries, batch.starts):
        alone.assign(start, seq.router, ids[start : start + n])
    want = alone.finalize(hidden)
    assert torch.equal(runner.plan.slots, alone.slots)
    torch.testing.assert_close(runner.plan.weights, alone.weights)
    assert torch.equal(runner.context.meta.sorted_pairs, want.sorted_pairs)


def _count_compiled_calls(monkeypatch, name: str) -> list:
    """The shapes of the first argument of each call of `decode_cpu.<name>` from now on (the
    test is skipped where the compiled CPU ops are not built)."""
    from kernels import decode_cpu

    with torch.no_grad():
        if not decode_cpu.enabled(torch.zeros(1, 1)):
            pytest.skip("the compiled CPU ops are not built here")
    calls, real = [], getattr(decode_cpu, name)
    monkeypatch.setattr(decode_cpu, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_gate_logits_take_the_compiled_norm_without_autograd(monkeypatch):
    """On CPU without autograd the gate normalizes with the compiled RMSNorm (one call), to the
    logits torch's rms_norm gives; with autograd (training) it keeps torch's."""
    import torch.nn.functional as F

    torch.manual_seed(6)
    gate = GateRouter(hidden_size=64, adapters=["math", "code", "image"], top_k=2)
    hidden = torch.randn(16, 64) * 3
    calls = _count_compiled_calls(monkeypatch, "rms_norm")
    with torch.no_grad():
        got = gate.logits(hidden)
        want = gate.gate(F.rms_norm(hidden, (64,), None, gate.eps))
    assert calls == [hidden.shape]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    trained = gate.logits(hidden)
    assert trained.requires_grad and len(calls) == 1


def test_gate_routes_take_one_compiled_call_without_autograd(monkeypatch):
    """On CPU without autograd a gate's slots and weights come from one compiled call, equal to
    forward's (its top-k, softmax-normalized) mapped through the lookup; with autograd (training)
    they come from forward, and the weights carry gradients to the gate."""
    torch.manual_seed(7)
    gate = GateRouter(hidden_size=64, adapters=["math", "code", "image", "chat"], top_k=2)
    hidden, lookup = torch.randn(24, 64) * 3, torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    calls = _count_compiled_calls(monkeypatch, "gate_route")
    with torch.inference_mode():
        slots, weights = gate.route_slots(hidden, lookup)
        index, want = gate(hidden)
    assert calls == [hidden.shape]
    assert torch.equal(slots, lookup[index]) and slots.dtype == torch.int32
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
    slots, trained = gate.route_slots(hidden, lookup)
    assert len(calls) == 1 and torch.equal(slots, lookup[index])
    (trained[:, 0] * torch.arange(24.0)).sum().backward()
    assert gate.gate.weight.grad is not None and gate.gate.weight.grad.abs().sum() > 0


def test_a_step_with_the_routes_of_the_step_before_reuses_its_metadata():
    """Constant routes equal to the step before's reuse its dispatch metadata (no rebuild); other
    routes, or a gate step in between (which writes the dispatch buffers), build it afresh, and
    every step's buffers hold its own routes."""
    torch.manual_seed(8)
    gate = GateRouter(hidden_size=8, adapters=["math", "code"], top_k=2)
    plan = RoutingPlan(max_tokens=8, max_k=2, num_slots=4)

    def step(specs, hidden=None):
        plan.begin(len(specs), 2)
        for row, spec in enumerate(specs):
            plan.assign(row, spec.bind(SLOT_OF), torch.tensor([row]))
        return plan.finalize(hidden)

    mixed = [AdapterSpec("code"), AdapterSpec("code"), MixtureSpec(("math", "image"), (0.25, 0.75))]
    first = step(mixed)
    again = step(mixed)
    assert again is first and plan.slots.tolist() == [[2, -1], [2, -1], [0, 3]]
    other = step([AdapterSpec("math")] * 3)
    assert other is not first and other.slots.tolist() == [0, -1] * 3 and other.host_counts() == [3, 0, 0, 0]
    back = step(mixed)
    assert back is not first and back.slots.tolist() == [2, -1, 2, -1, 0, 3]
    step([GateSpec(gate)] * 3, torch.randn(3, 8))  # writes the dispatch buffers
    after = step(mixed)
    assert after is not back and after.slots.tolist() == [2, -1, 2, -1, 0, 3]
    assert after.weights.tolist() == [1.0, 0.0, 1.0, 0.0, 0.25, 0.75] and after.host_counts() == [1, 0, 2, 1]
    assert after.sorted_pairs.tolist()[:4] == [4, 0, 2, 5]


@pytest.mark.parametrize("grad", [False, True])
def test_routers_write_the_plan_in_place_and_uncovered_pairs_are_cleared(monkeypatch, grad):
    """The plan's routes are its dispatch buffers, which routers write in place (the compiled
    gate into rows that have more choices than it takes, without autograd); the pairs that no
    route of a step covers hold no adapter, whatever the step before wrote there."""
    torch.manual_seed(9)
    gate = GateRouter(hidden_size=8, adapters=["math", "code", "image"], top_k=2)
    lookup = [SLOT_OF[name] for name in gate.adapters]
    plan = RoutingPlan(max_tokens=8, max_k=3, num_slots=4)
    calls = _count_compiled_calls(monkeypatch, "gate_route") if not grad else None
    with torch.set_grad_enabled(grad):
        plan.begin(6, 3)  # the step before: three adapters on every pair
        plan.assign(0, MixtureSpec(("math", "code", "image"), (0.5, 0.25, 0.25)).bind(SLOT_OF), torch.arange(6))
        plan.finalize()
        hidden = torch.randn(6, 8)
        plan.begin(6, 3)  # gate on rows 0-3 (two choices of three), rows 4-5 on the base model
        plan.assign(0, GateSpec(gate).bind(SLOT_OF), torch.arange(4))
        plan.assign(4, BaseSpec().bind(SLOT_OF), torch.arange(2))
        meta = plan.finalize(hidden)
        index, weights = gate(hidden[:4])
    assert meta.slots.data_ptr() == plan.slots.data_ptr() and meta.weights.data_ptr() == plan.weights.data_ptr()
    assert plan.slots[:4, :2].tolist() == [[lookup[i] for i in row] for row in index.tolist()]
    torch.testing.assert_close(plan.weights[:4, :2], weights.detach())
    assert plan.slots[:4, 2].tolist() == [-1] * 4 and plan.slots[4:].tolist() == [[-1] * 3] * 2
    assert plan.weights[:4, 2].tolist() == [0.0] * 4 and plan.weights[4:].tolist() == [[0.0] * 3] * 2
    assert meta.slot_counts.tolist() == [torch.tensor(lookup)[index].eq(s).sum().item() for s in range(4)]
    assert calls is None or calls == [(4, 8)]


def test_gate_ties_go_to_the_lower_adapter_on_every_path():
    """torch.topk's order of ties is unspecified (on CPU it took the higher indices) while the
    compiled route takes the lower: a tied gate then routed differently with and without the
    compiled kernels, and between eager and fixed-shape decode steps."""
    gate = GateRouter(16, ["a", "b", "c", "d"], top_k=2)
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    hidden = torch.randn(5, 16)
    index, weights = gate(hidden)
    assert index.tolist() == [[1, 2]] * 5 and torch.allclose(weights, torch.full((5, 2), 0.5))
    lookup = torch.tensor([7, 6, 5, 4], dtype=torch.int32)
    with torch.inference_mode():
        slots, _ = gate.route_slots(hidden, lookup)  # the compiled route where the CPU kernels are built
    assert slots.tolist() == [[6, 5]] * 5
