"""Freed heap memory stays with the process, so a CPU step's large temporaries reuse its pages.

glibc's malloc gives each block above its mmap threshold a mapping of its own, unmapped when
freed, and hands free memory at the top of the heap back to the kernel once there is more of it
than its trim threshold; both thresholds follow the largest mapped block freed so far (128 KiB
at first, at most 32 MiB and twice that). A prefill layer's temporaries add up to several times
its largest one, so where they come back to the top of the heap when freed (which depends on
what else the heap holds: in the engine processes measured on this project's AVX2 VM, which load
tokenizers through transformers, they did; on CI's machine the same blocks stayed) each layer of
each prefill faults its pages in afresh. On the engine
benchmark's quick size (512 prompt tokens, hidden 256, this project's 2-core VM) that was 2,300
to 6,500 minor page faults a prefill step, at about 5 us each; with this module none, and the
prefill's median fell from 52-73 ms to 37-64 (base) and from 61-84 to 46-77 (gate routing) in
6 processes each way, alternated. Decode steps fault none either way. Blocks above 32 MiB (a
4,096-token prefill's fp32 MLP intermediate of width 2,560 is 40 MiB) are mapped and unmapped
each time whatever the layout, so long prefills fault every layer without this module.

`keep_freed_memory()` raises both thresholds (mallopt): blocks up to MMAP_THRESHOLD come from the
heap, and up to TRIM_THRESHOLD of free heap stays mapped for the next step. The process's
resident memory then stays near its high-water mark, as a server's does with tcmalloc or
jemalloc preloaded (whose malloc this leaves alone). CPU engines call it. It does nothing where
the C library is not glibc, where the user tuned malloc through the environment
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, GLIBC_TUNABLES), or with
MOLORA_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV_SWITCH = "MOLORA_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20  # older glibc refuses more than 32 MiB: FALLBACK_MMAP_THRESHOLD then
FALLBACK_MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process, once; True if they were set."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("%s=0: glibc's malloc keeps its own thresholds", ENV_SWITCH)
        return False
    tuned = [name for name in USER_TUNING if name in os.environ]
    if tuned:
        log.info("malloc tuned through %s: its thresholds are left as set", ", ".join(tuned))
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD)
    trim_set = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not (mmap_set and trim_set):
        log.warning("glibc refused malloc thresholds (mmap %s, trim %s): CPU steps may fault their temporaries' "
                    "pages in afresh", bool(mmap_set), bool(trim_set))
        return False
    return True
