"""One OpenMP team per process: the engine's step thread computes, every other thread runs alone.

PyTorch runs CPU ops in parallel through OpenMP (libgomp in the Linux wheels). Each thread that
opens a parallel region gets a team of its own, whose workers live as long as that thread does,
and libgomp counts the workers of every team. Once they outnumber the CPUs, a worker that ends a
region spins 1,000 times instead of 300,000 before it sleeps on a futex ("throttled" spinning),
so each of a decode step's few hundred small ops pays a futex wake-up of its workers.

An engine's own threads open teams without meaning to: an adapter load on a fetch thread checks
its tensors for NaN (one parallel reduction is enough), a serving replica loads the model on one
thread and steps on another. Measured on this project's 2-core CPU machine with the engine
benchmark's Qwen3-0.6B-shaped model (4 layers, 16 sequences, fp32), base decode step p50:

- foreground engine: 20-25 ms before its first cold adapter load, 29-38 ms after it, with about
  4,400 voluntary context switches per 32-step run against none; fetch threads confined: 21 ms
  after it, and none;
- background engine (serving): 25 ms and about 4,670 switches per run while the thread that built
  it kept its team; 21 ms and about 140 (the caller waiting for results) with it released.

`benchmarks/engine.py` runs its scenarios and the transformers + PEFT baseline in one process, so
before this every run after the first adapter load was throttled, the baseline's most of all
(156 ms per token and 54,630 switches per run; 91 ms and 1 now).

`confine()` makes the calling thread run torch's CPU ops on itself alone, so it never opens a
team: the engine's fetch threads call it first, and so do a replica's background threads.
`release()` ends the calling thread's team (OpenMP 5's `omp_pause_resource_all`): a background
engine calls it on the thread that built it, whose team loaded the weights. Both are no-ops
(returning False) where the process has no OpenMP runtime with these entry points.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

# Shared objects of the OpenMP runtimes torch builds link: GNU, Intel, LLVM.
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.lru_cache(maxsize=None)
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process (torch's), or None."""
    torch.get_num_threads()  # loads torch's CPU library, and OpenMP with it
    for lib in _loaded_libraries():
        if hasattr(lib, "omp_set_num_threads"):
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            if hasattr(lib, "omp_pause_resource_all"):
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
    log.debug("no OpenMP runtime found in this process; CPU threads are not confined")
    return None


def _loaded_libraries():
    """The process's global symbols, then each loaded OpenMP runtime by path (opening an
    already loaded library returns it, not a second copy)."""
    try:
        yield ctypes.CDLL(None)
    except (OSError, TypeError):  # no global symbol table on this platform
        pass
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:
        return
    for path in paths:
        if os.path.basename(path).startswith(_RUNTIMES):
            try:
                yield ctypes.CDLL(path)
            except OSError:
                continue


def confine() -> bool:
    """Run the calling thread's torch CPU ops on that thread alone (no OpenMP team of its own),
    for the rest of its life; other threads keep their counts. True if it took effect."""
    lib = _runtime()
    if lib is None:
        return False
    # torch sets each thread's OpenMP count from the process-wide one the first time the thread
    # asks for it; ask first, so that first time cannot undo the count set below.
    torch.get_num_threads()
    lib.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


def release() -> bool:
    """End the calling thread's OpenMP team, so its idle workers stop counting against the
    CPUs; a later parallel op on this thread starts a new one. True if it took effect. Call it
    outside any parallel region (as Python code always is)."""
    lib = _runtime()
    if lib is None or not hasattr(lib, "omp_pause_resource_all"):
        return False
    return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft
