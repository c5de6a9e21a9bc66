"""cpu_threads: a confined thread runs torch on itself alone, `release` ends a thread's OpenMP
team, and the engine's cold loads run on confined threads.

Each check needs torch to run more than one CPU thread (otherwise every count is 1 anyway).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from molora_core import cpu_threads
from molora_core.demo import ensure_demo_assets
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one CPU thread here")
ROOT = Path(__file__).resolve().parents[2]


def _in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_confine_limits_the_calling_thread_only():
    threads = torch.get_num_threads()

    def confined():
        own = torch.get_num_threads()
        took = cpu_threads.confine()
        total = torch.ones(1 << 20).sum().item()  # big enough to run in parallel where it may
        return own, took, torch.get_num_threads(), total

    own, took, after, total = _in_thread(confined)
    assert (own, took, after, total) == (threads, True, 1, float(1 << 20))
    assert torch.get_num_threads() == threads
    assert _in_thread(torch.get_num_threads) == threads  # a later thread starts unconfined


def test_release_ends_the_calling_threads_team():
    # In a fresh process, where no other thread starts or ends while the threads are counted.
    script = textwrap.dedent("""
        import os, threading, time, torch
        from molora_core import cpu_threads

        def tasks():
            return len(os.listdir("/proc/self/task"))

        def body():
            idle = tasks()
            torch.ones(1 << 22).sum()  # a parallel reduction: this thread's team starts
            with_team = tasks()
            released = cpu_threads.release()
            deadline = time.monotonic() + 5  # the paused team's workers exit on their own threads
            while tasks() > idle and time.monotonic() < deadline:
                time.sleep(0.01)
            print(idle, with_team, released, tasks(), torch.get_num_threads())

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    idle, with_team, released, after, threads = out.stdout.split()
    workers = int(threads) - 1
    assert int(with_team) == int(idle) + workers
    assert released == "True" and int(after) == int(idle)


def test_cold_loads_run_on_confined_threads(tmp_path_factory):
    demo = ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")
    seen = []

    def loader(name):
        seen.append((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
        return load_peft_adapter(demo / "adapters" / name, name=name)

    threads = torch.get_num_threads()
    engine = Engine(demo / "model", EngineConfig(max_batch=2, max_seq_len=64, hot_slots=2, max_rank=8),
                    adapter_loader=loader)
    try:
        (out,) = engine.generate([Request("def add_3(x):", SamplingParams(max_tokens=3), AdapterSpec("code"))])
    finally:
        engine.close()
    assert out.completion_tokens == 3
    assert seen == [("molora-fetch", 1)]
    assert torch.get_num_threads() == threads  # the caller, which ran the steps, kept its threads


def test_a_background_engine_releases_the_team_of_the_thread_that_built_it(tmp_path_factory, monkeypatch):
    demo = ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")
    released = []
    monkeypatch.setattr(cpu_threads, "release", lambda: released.append(threading.current_thread()) or True)
    foreground = Engine(demo / "model", EngineConfig(max_batch=2, max_seq_len=64, hot_slots=2, max_rank=8))
    foreground.close()
    assert released == []  # the caller runs the steps: its team does the work
    background = Engine(demo / "model", EngineConfig(max_batch=2, max_seq_len=64, hot_slots=2, max_rank=8),
                        background=True)
    try:
        (out,) = background.generate([Request("Bonjour", SamplingParams(max_tokens=2))])
    finally:
        background.close()
    assert out.completion_tokens == 2
    assert released == [threading.current_thread()]
