"""The compiled CPU extension: `csrc/lora_cpu.cpp` (the LoRA kernel, `kernels.lora_cpu`)
and `csrc/decode_cpu.cpp` (the decoder's per-token ops, `kernels.decode_cpu`), one build.

The sources are compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja;
about 40 s on 2 cores) for the CPU it runs on, into torch's extension cache, whose entry is keyed
by the CPU's instruction-set flags, so an image built elsewhere never runs code this CPU lacks;
later processes load the cached build (torch rebuilds it when a source changes). Where it cannot
be built, or where MOLORA_CPU_KERNELS=0, `module()` is None (logged once) and callers keep to
torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("lora_cpu.cpp", "decode_cpu.cpp")]
ENV_SWITCH = "MOLORA_CPU_KERNELS"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the compiled ops take


@functools.lru_cache(maxsize=None)
def _flags_line() -> str:
    """/proc/cpuinfo's instruction-set flags line ("" where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as Linux names them (avx2, avx512_bf16, ...); empty where
    /proc/cpuinfo cannot be read."""
    return frozenset(_flags_line().partition(":")[2].split())


# Instructions that give a CPU native dot products of a 16-bit dtype, which oneDNN's matmuls use;
# without them torch's CPU bf16 and fp16 matmuls convert and run several times slower than fp32.
NATIVE_DOT_FLAGS = {torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16"}),
                    torch.float16: frozenset({"avx512_fp16", "amx_fp16"})}


def native_dots(dtype: torch.dtype) -> bool:
    """True for fp32, and for bf16 or fp16 on a CPU with dot-product instructions for it
    (`NATIVE_DOT_FLAGS`)."""
    return dtype == torch.float32 or bool(cpu_flags() & NATIVE_DOT_FLAGS.get(dtype, frozenset()))


def _cpu_key() -> str:
    """A short hash of this CPU's instruction-set flags (and machine type)."""
    return hashlib.sha256(f"{platform.machine()} {_flags_line()}".encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def module():
    """The built extension, or None where it cannot be built or is switched off (logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("%s=0: the compiled CPU kernels are off, so CPU steps run torch ops", ENV_SWITCH)
        return None
    try:
        return build()
    except Exception as exc:  # no compiler or ninja, an unsupported platform: torch ops run
        log.warning("the compiled CPU kernels could not be built, so CPU steps run torch ops: %s", exc)
        return None


def build(lanes: int | None = None):
    """Compile the extension for this CPU, or load its cached build; raises where it cannot.

    The LoRA kernel's fp32 vectors are 16 lanes wide where the CPU has AVX-512 and 8 elsewhere
    (its `lanes`). `lanes` (8 or 16) forces the width and builds the LoRA kernel alone, without the
    decoder's ops: the tests run the width this CPU does not pick against the torch twins too.
    """
    from torch.utils.cpp_extension import load

    if lanes not in (None, 8, 16):
        raise ValueError(f"lanes must be 8 or 16, not {lanes}")
    _find_ninja()
    # (16 lanes without AVX-512: GCC warns that such vectors are passed differently, which is
    # harmless inside one file)
    forced = [] if lanes is None else [f"-DMOLORA_LANES={lanes}", "-Wno-psabi"]
    return load(
        name=f"molora_cpu_{_cpu_key()}" + ("" if lanes is None else f"_lanes{lanes}"),
        sources=[str(source) for source in (SOURCES if lanes is None else SOURCES[:1])],
        extra_cflags=["-O3", "-march=native", "-fopenmp", *forced],
        extra_ldflags=["-fopenmp"],
    )


def _find_ninja() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) installs it among the
    interpreter's scripts, which are not on PATH when a venv's python runs without activating
    the venv. Where it is missing from both, load() says so."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """True once the extension is built (building it now if needed)."""
    return module() is not None
