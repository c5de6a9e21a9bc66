"""cpu_memory: with glibc's thresholds raised, a step's freed temporaries keep their pages, so
the next step does not fault them in again; the user's own malloc tuning and the off switch are
left alone (test_engine checks that CPU engines ask for it)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from molora_core import cpu_memory

ROOT = Path(__file__).resolve().parents[2]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Steps in a fresh process (malloc's settings are the process's), each of four layers whose
# temporaries are all freed by the layer's end. transformers is imported first, as in every engine
# process. Two sizes of temporaries:
# - PREFILL_LIKE, 10 MB of blocks of up to 3 MB a layer (the engine benchmark's quick prefill).
#   Whether glibc's own thresholds give those pages back depends on the heap's layout: in the
#   engine processes measured on this project's AVX2 VM they did, every layer; on CI's machine the
#   same steps kept them.
# - LONG_PREFILL, one 40 MiB block a layer (a 4,096-token prefill's fp32 MLP intermediate of
#   width 2,560 is that size): above the 32 MiB to which glibc's mmap threshold can grow by
#   itself, so without the setting every block is mapped and unmapped, and every step faults all
#   its pages, whatever the layout.
PREFILL_LIKE = (6 << 17, 6 << 17, 3 << 17, 3 << 17, 2 << 17)  # floats: 3, 3, 1.5, 1.5, 1 MB
LONG_PREFILL = (10 << 20,)  # floats: 40 MiB
_STEPS = textwrap.dedent("""
    import json, resource, sys, torch, transformers
    from molora_core import cpu_memory

    kept = cpu_memory.keep_freed_memory()
    torch.set_num_threads(1)
    sizes = json.loads(sys.argv[1])

    def step():
        for _ in range(4):
            temporaries = [torch.ones(n) for n in sizes]
            del temporaries

    step()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    pages = 5 * 4 * sum(sizes) * 4 // 4096
    print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                      "pages": pages}))
""")


def _run_steps(sizes, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in (cpu_memory.ENV_SWITCH, *cpu_memory.USER_TUNING)}
    done = subprocess.run([sys.executable, "-c", _STEPS, json.dumps(sizes)], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
@pytest.mark.parametrize("sizes", [PREFILL_LIKE, LONG_PREFILL], ids=["prefill_like", "long_prefill"])
def test_freed_temporaries_keep_their_pages(sizes):
    kept = _run_steps(sizes)
    assert kept["kept"], kept
    # Steps after the first two touch only pages the process already has.
    assert kept["faults"] <= 0.02 * kept["pages"], kept


@glibc_only
def test_without_the_setting_long_prefills_fault_every_step():
    """The negative control: the count above sees faults where glibc unmaps freed blocks."""
    default = _run_steps(LONG_PREFILL, **{cpu_memory.ENV_SWITCH: "0"})
    assert not default["kept"]
    assert default["faults"] >= 0.9 * default["pages"], default


@glibc_only
@pytest.mark.parametrize("env", [{cpu_memory.ENV_SWITCH: "0"}, {"MALLOC_TRIM_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}])
def test_the_switch_and_the_users_own_tuning_are_left_alone(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cpu_memory.keep_freed_memory.cache_clear()
    try:
        assert cpu_memory.keep_freed_memory() is False
    finally:
        cpu_memory.keep_freed_memory.cache_clear()
