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

# A prefill-like run in a fresh process (malloc's settings are the process's): four layers a
# step, each with 10 MB of temporaries of up to 3 MB, all freed by the layer's end. transformers
# is imported first, as in every engine process: the heap's layout it leaves is the one in which
# the engine's prefills faulted every step.
_STEPS = textwrap.dedent("""
    import json, resource, torch, transformers
    from molora_core import cpu_memory

    kept = cpu_memory.keep_freed_memory()
    torch.set_num_threads(1)
    sizes = (6 << 17, 6 << 17, 3 << 17, 3 << 17, 2 << 17)  # floats: 3, 3, 1.5, 1.5, 1 MB

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


def _run_steps(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in (cpu_memory.ENV_SWITCH, *cpu_memory.USER_TUNING)}
    done = subprocess.run([sys.executable, "-c", _STEPS], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_temporaries_keep_their_pages():
    kept, default = _run_steps(), _run_steps(**{cpu_memory.ENV_SWITCH: "0"})
    assert kept["kept"] and not default["kept"]
    # Steps after the first two touch only pages the process already has.
    assert kept["faults"] <= 0.02 * kept["pages"], kept
    # glibc's own thresholds gave those pages back to the kernel and faulted them in again.
    assert default["faults"] >= 0.5 * default["pages"], default


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

