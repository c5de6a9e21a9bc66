"""The engine under pressure: requests that wait for batch or hot-set slots, loads that fail or
are refused, handles dropped anywhere, submit racing close, and offline batches over the queue."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from molora_core.adapter import LoRAAdapter, LoRAModule
from molora_core.demo import ensure_demo_assets
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams
from molora_core.errors import AdapterInvalid
from molora_core.hotset import HotSet
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _engine(demo, loader=None, **config) -> Engine:
    config = {"max_batch": 2, "max_seq_len": 96, "hot_slots": 2, "max_rank": 8, **config}
    return Engine(demo / "model", EngineConfig(**config), adapter_loader=loader)


def test_a_failed_request_leaves_its_kv_slot_zeroed(demo, monkeypatch):
    """A request that fails after its step's forward (an adapter whose finite weights overflow:
    NaN logits, and sampling raises) had that step's rows left in its freed slot; decode
    attention over a slot span reads them (masked), so NaN reached the next requests."""
    monkeypatch.setenv("MOLORA_CPU_KERNELS", "0")  # the torch decode path, the one that reads them

    def loader(name):
        good = load_peft_adapter(demo / "adapters" / "math", name=name)
        if name != "boom":
            return good
        return LoRAAdapter(name, {p: LoRAModule(torch.full_like(m.lora_a, 1e20), torch.full_like(m.lora_b, 1e20), 1.0)
                                  for p, m in good.modules.items()})

    engine = _engine(demo, loader, prefill_chunk=64)
    boom = engine.submit(Request("User: Hello!\nAssistant:", SamplingParams(max_tokens=4, temperature=1.0, seed=1),
                                 AdapterSpec("boom")))
    with pytest.raises(RuntimeError):
        boom.result()
    assert not engine.kv_cache.k.any() and not engine.kv_cache.v.any()
    requests = [Request("Bonjour", _greedy(4)), Request("def add_3(x):", _greedy(12))]
    got = [h.result().token_ids for h in [engine.submit(r) for r in requests]]
    fresh = _engine(demo, loader, prefill_chunk=64, prefix_caching=False)
    assert got == [o.token_ids for o in fresh.generate(requests)]


def test_the_pin_timeout_counts_from_the_first_try_not_from_arrival(demo):
    """A request that waited longer than pin_timeout_s for a batch slot got it, then failed at
    once, its adapter never loaded."""
    engine = _engine(demo, lambda n: load_peft_adapter(demo / "adapters" / n, name=n), max_batch=1, pin_timeout_s=1.0)
    busy = engine.submit(Request("def add(a, b):", _greedy(10)))
    engine.step()  # `busy` takes the only KV slot
    cold = engine.submit(Request("Q: what is 1 plus 2?", _greedy(4), AdapterSpec("math")))
    time.sleep(1.3)
    busy.result()
    assert cold.result().finish_reason == "length"


def test_a_request_waiting_for_a_hot_set_slot_is_not_passed_over(demo):
    """With every slot pinned, requests behind a waiter that pin adapters wait behind it too (each
    would keep the waiter's slot pinned); it is admitted once the running ones release it."""
    load = lambda n: load_peft_adapter(demo / "adapters" / n, name=n)  # noqa: E731
    engine = _engine(demo, load, hot_slots=1, pin_timeout_s=3.0, max_queue=64)
    engine.load_adapter("code", load("code"))
    code = lambda: Request("def add(a, b):", _greedy(6), AdapterSpec("code"))  # noqa: E731
    engine.submit(code())
    engine.step()
    waiter = engine.submit(Request("Q: what is 1 plus 2?", _greedy(4), AdapterSpec("math")))
    started = time.monotonic()
    while not any(s is not None and s.request_id == waiter.request_id for s in engine._running):
        assert time.monotonic() - started < 20, "the waiter was never admitted"
        while sum(1 for s in engine._waiting if s.request_id != waiter.request_id) < 2:
            engine.submit(code())  # a steady stream for the resident adapter, queued behind it
        engine.step()
    assert waiter.result().finish_reason == "length"


def test_an_adapter_the_hot_set_refused_is_loaded_anew_by_the_next_request(demo):
    calls = []

    def loader(name):
        calls.append(name)
        good = load_peft_adapter(demo / "adapters" / name, name=name)
        if len(calls) > 1:
            return good
        return LoRAAdapter(name, {p: LoRAModule(torch.zeros(32, m.lora_a.shape[1]), torch.zeros(m.lora_b.shape[0], 32),
                                                1.0) for p, m in good.modules.items()})  # rank 32 > max_rank 8

    engine = _engine(demo, loader)
    request = lambda: Request("Q: what is 1 plus 2?", _greedy(3), AdapterSpec("math"))  # noqa: E731
    with pytest.raises(AdapterInvalid, match="rank 32"):
        engine.submit(request()).result()
    assert engine.submit(request()).result().finish_reason == "length" and len(calls) == 2


def test_requests_waiting_on_a_full_hot_set_do_not_rescan_their_adapters_every_step(demo, monkeypatch):
    load = lambda n: load_peft_adapter(demo / "adapters" / n, name=n)  # noqa: E731
    engine = _engine(demo, load, max_batch=8, hot_slots=1, pin_timeout_s=60)
    engine.load_adapter("code", load("code"))
    hold = engine.submit(Request("def add(a, b):", _greedy(40), AdapterSpec("code")))
    engine.step()
    waiters = [engine.submit(Request(f"Q: {i} plus 2?", _greedy(2), AdapterSpec("math"))) for i in range(6)]
    scans = []
    validate = HotSet.validate
    monkeypatch.setattr(HotSet, "validate", lambda self, adapter: scans.append(1) or validate(self, adapter))
    for _ in range(20):
        engine.step()
    assert not hold.finished and scans == []  # (each step, six pins found no slot before any scan)
    for h in waiters:
        h.close()


def test_a_handle_finalized_on_the_step_thread_inside_the_lock_does_not_deadlock(demo):
    """The cyclic garbage collector runs a dropped handle's finalizer on whatever thread
    allocates: the step thread too, while it holds the engine's lock. The finalizer took that
    lock (to abort): the thread waited on itself forever. It now queues the abort, lock-free."""
    engine = _engine(demo)
    dropped = engine.submit(Request("def add(a, b):", _greedy(50)))
    other = engine.submit(Request("x = ", _greedy(3)))
    engine.step()
    finalized = threading.Event()

    def finalize_under_the_lock():
        with engine._lock:
            dropped.__del__()
        finalized.set()

    threading.Thread(target=finalize_under_the_lock, daemon=True).start()
    assert finalized.wait(5), "the finalizer blocked on the engine's lock"
    engine.step()
    assert engine.stats().aborted == 1 and other.result().finish_reason == "length"


def test_a_submit_that_races_close_is_refused_not_left_queued(demo, monkeypatch):
    engine = _engine(demo)
    sequence = engine.admission.sequence

    def sequence_while_closing(request):
        seq = sequence(request)
        engine.close()  # another thread shuts the engine down meanwhile
        return seq

    monkeypatch.setattr(engine.admission, "sequence", sequence_while_closing)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(Request("def add(a, b):", _greedy(3)))
    assert engine.stats().waiting == 0


def test_an_offline_batch_larger_than_the_queue_runs(demo):
    engine = _engine(demo, max_queue=4)
    outputs = engine.generate([Request(f"Q: {i} plus 2?", _greedy(2)) for i in range(11)])
    assert [o.finish_reason for o in outputs] == ["length"] * 11
