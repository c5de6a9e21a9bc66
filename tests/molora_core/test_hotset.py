"""Hot-set: in-place loads at fixed addresses, pinning, LRU eviction, host tier, validation."""

import threading

import pytest
import torch

from molora_core.adapter import LoRAAdapter, LoRAModule
from molora_core.errors import AdapterInvalid, AdapterNotFound, CapacityExceeded
from molora_core.hotset import HotSet
from tests.molora_core.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (64, 32)}


def _hotset(num_slots=3, max_rank=16, **kwargs):
    return HotSet(SHAPES, num_slots=num_slots, max_rank=max_rank, **kwargs)


def _adapter(name, rank=8, seed=0, shapes=SHAPES):
    return random_adapter(shapes, name, rank=rank, seed=seed)


def _all_ptrs(hotset):
    return [ptr for b in hotset.buffers.values() for ptr in b.data_ptrs()]


def test_loads_copy_in_place_and_pointers_never_change():
    hotset = _hotset(num_slots=2)
    ptrs = _all_ptrs(hotset)
    for i in range(6):  # more adapters than slots: loads, evictions, host-tier reloads
        name = f"a{i % 4}"
        slot = hotset.acquire(name, lambda i=i: _adapter(f"a{i % 4}", rank=4 + 4 * (i % 3), seed=i % 4))
        hotset.release(name)
        assert _all_ptrs(hotset) == ptrs
        module = hotset._slots[slot].adapter.modules["model.layers.0.self_attn.q_proj"]
        buffers = hotset.buffers["model.layers.0.self_attn.q_proj"]
        r = module.rank
        assert torch.equal(buffers.lora_a_stacked[slot, :r], module.lora_a)
        assert torch.equal(buffers.lora_b_stacked[slot, :, :r], module.lora_b)
        assert buffers.lora_a_stacked[slot, r:].abs().sum() == 0, "rank padding must be zero"
        assert int(buffers.slot_ranks[slot]) == r
        assert float(buffers.slot_scales[slot]) == pytest.approx(module.scale)


def test_pinned_slots_are_never_evicted_and_full_pins_raise():
    hotset = _hotset(num_slots=2)
    hotset.acquire("a", lambda: _adapter("a"))
    hotset.acquire("b", lambda: _adapter("b", seed=1))
    with pytest.raises(CapacityExceeded, match="all 2 hot-set slots are pinned"):
        hotset.acquire("c", lambda: _adapter("c", seed=2))
    assert set(hotset.resident()) == {"a", "b"}
    hotset.release("a")
    slot_c = hotset.acquire("c", lambda: _adapter("c", seed=2))
    assert set(hotset.resident()) == {"b", "c"} and slot_c == 0
    assert hotset.stats.evictions == 1


def test_lru_evicts_least_recently_used_unpinned():
    hotset = _hotset(num_slots=3)
    for name in "abc":
        hotset.acquire(name, lambda n=name: _adapter(n))
        hotset.release(name)
    hotset.acquire("a")  # touch a: b is now the oldest
    hotset.release("a")
    hotset.acquire("d", lambda: _adapter("d"))
    assert set(hotset.resident()) == {"a", "c", "d"}
    assert hotset.host_keys() == ["b"]


def test_evicted_adapter_comes_back_from_host_tier_without_loader():
    hotset = _hotset(num_slots=1)
    calls = []

    def loader():
        calls.append(1)
        return _adapter("a")

    hotset.acquire("a", loader)
    hotset.release("a")
    hotset.acquire("b", lambda: _adapter("b", seed=3))
    hotset.release("b")
    hotset.acquire("a")  # no loader: served from host memory
    assert len(calls) == 1
    assert hotset.stats.host_hits == 1 and hotset.stats.cold_loads == 2
    with pytest.raises(AdapterNotFound):
        hotset.acquire("never-loaded")


def test_host_tier_respects_its_byte_cap():
    one = _adapter("x").nbytes
    hotset = _hotset(num_slots=1, host_cache_bytes=int(one * 1.5))
    for name in "abc":
        hotset.acquire(name, lambda n=name: _adapter(n))
        hotset.release(name)
    assert hotset.host_keys() == ["b"]


def test_mixed_ranks_share_one_hotset():
    hotset = _hotset(num_slots=3, max_rank=16)
    slots = [hotset.acquire(f"r{r}", lambda r=r: _adapter(f"r{r}", rank=r)) for r in (4, 16, 1)]
    buffers = hotset.buffers["model.layers.0.mlp.down_proj"]
    assert buffers.slot_ranks[slots].tolist() == [4, 16, 1]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _adapter("big", rank=32), r"rank 32 is over the hot-set's max_rank 16"),
        (
            lambda: _adapter("shape", shapes={"model.layers.0.self_attn.q_proj": (32, 48)}),
            r"module model.layers.0.self_attn.q_proj: lora_a \(8, 32\) and lora_b \(48, 8\); expected \(8, 32\) and \(32, 8\)",
        ),
        (
            lambda: _adapter("unknown", shapes={"model.layers.0.mlp.up_proj": (32, 64)}),
            r"targets module 'model.layers.0.mlp.up_proj'.*expected one of the modules named \['down_proj', 'q_proj'\]",
        ),
        (lambda: _nan_adapter(), r"module model.layers.0.mlp.down_proj: lora_b holds NaN or Inf"),
    ],
    ids=["rank", "shape", "unknown-module", "nan"],
)
def test_invalid_adapters_raise_and_leave_hotset_unchanged(make, match):
    hotset = _hotset(num_slots=1)
    hotset.acquire("ok", lambda: _adapter("ok"))
    hotset.release("ok")
    before = {k: (b.lora_a_stacked.clone(), b.lora_b_stacked.clone(), b.slot_ranks.clone()) for k, b in hotset.buffers.items()}
    with pytest.raises(AdapterInvalid, match=match):
        hotset.acquire("bad", make)
    assert hotset.resident() == {"ok": 0} and hotset.stats.evictions == 0
    for key, buffers in hotset.buffers.items():
        a, b, ranks = before[key]
        assert torch.equal(buffers.lora_a_stacked, a) and torch.equal(buffers.lora_b_stacked, b)
        assert torch.equal(buffers.slot_ranks, ranks)


def _nan_adapter():
    adapter = _adapter("nan")
    module = adapter.modules["model.layers.0.mlp.down_proj"]
    lora_b = module.lora_b.clone()
    lora_b[0, 0] = float("nan")
    adapter.modules["model.layers.0.mlp.down_proj"] = LoRAModule(module.lora_a, lora_b, module.scale)
    return adapter


def test_adapter_targeting_a_subset_clears_other_modules_of_the_slot():
    hotset = _hotset(num_slots=1)
    hotset.acquire("full", lambda: _adapter("full"))
    hotset.release("full")
    q_only = {"model.layers.0.self_attn.q_proj": SHAPES["model.layers.0.self_attn.q_proj"]}
    slot = hotset.acquire("q", lambda: _adapter("q", shapes=q_only))
    down = hotset.buffers["model.layers.0.mlp.down_proj"]
    assert int(down.slot_ranks[slot]) == 0 and down.lora_a_stacked[slot].abs().sum() == 0


def test_remove_while_pinned_retires_the_slot_until_release():
    hotset = _hotset(num_slots=2)
    slot = hotset.acquire("a@1", lambda: _adapter("a"))
    hotset.remove("a@1")
    assert hotset.slot_of("a@1") is None
    new_slot = hotset.acquire("a@2", lambda: _adapter("a", seed=9))
    assert new_slot != slot, "a retired slot is not handed out while pinned"
    hotset.release("a@1", slot)
    assert hotset._slots[slot] is None
    assert int(hotset.buffers["model.layers.0.self_attn.q_proj"].slot_ranks[slot]) == 0


def test_concurrent_acquire_of_one_adapter_loads_once():
    hotset = _hotset(num_slots=2)
    barrier = threading.Barrier(8)
    slots = []

    def worker():
        barrier.wait()
        slots.append(hotset.acquire("a", lambda: _adapter("a")))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(slots)) == 1 and hotset.pins("a") == 8
    assert len(hotset.resident()) == 1


def test_release_of_unpinned_adapter_is_an_error():
    hotset = _hotset()
    with pytest.raises(AdapterNotFound):
        hotset.release("nobody")


def test_for_model_finds_target_linears():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(8, 16)
    model.other = torch.nn.Linear(8, 8)
    hotset = HotSet.for_model(model, ["q_proj"], num_slots=2, max_rank=4)
    assert list(hotset.buffers) == ["q_proj"]
    assert hotset.buffers["q_proj"].lora_b_stacked.shape == (2, 16, 4)
    empty = LoRAAdapter("empty", {})
    with pytest.raises(AdapterInvalid, match="has no modules"):
        hotset.validate(empty)
