"""What every benchmark records beside its numbers: the device, the versions and the command."""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable


# Instruction sets that change which CPU path is fastest (kernels.lora_cpu.takes, kernels.onednn).
CPU_FLAGS_OF_NOTE = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16"})


def _cpu_model() -> str:
    """/proc/cpuinfo's model name ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.partition(":")[2].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        return ""


@functools.cache
def _cgroup_cpu_dir() -> Path | None:
    """This process's cgroup directory for the CPU controller (v2, or v1's `cpu`), if mounted
    (read once: the counters ask on every run)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2's one hierarchy
            candidates = [Path("/sys/fs/cgroup") / path.lstrip("/")]
        elif "cpu" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup") / name / path.lstrip("/") for name in ("cpu", "cpu,cpuacct")]
        else:
            continue
        for directory in candidates + [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")]:
            if (directory / "cpu.stat").is_file():
                return directory
    return None


def _quota_cpus(directory: Path | None) -> float | None:
    """The cgroup's CPU quota in CPUs: v2's cpu.max ("<quota> <period>", "max" for none) or v1's
    cpu.cfs_quota_us (-1 for none) over its period; None where there is none or it is unreadable."""
    try:
        if directory is not None and (directory / "cpu.max").is_file():
            quota, period = (directory / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if directory is not None and (directory / "cpu.cfs_quota_us").is_file():
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def cpu_limits() -> dict:
    """The CPUs this process may run on (`affinity_cpus`) and its cgroup's CPU quota in CPUs
    (`quota_cpus`, None where there is none): a quota below the threads a run keeps busy
    throttles every thread of the process, the launching one too."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"affinity_cpus": affinity, "quota_cpus": _quota_cpus(_cgroup_cpu_dir())}


def cpu_throttling() -> dict | None:
    """The cgroup's CPU throttling so far: periods throttled and milliseconds (`cpu.stat`); None
    where it cannot be read."""
    directory = _cgroup_cpu_dir()
    if directory is None:
        return None
    try:
        stat = dict(line.split() for line in (directory / "cpu.stat").read_text().splitlines() if line.strip())
        if "throttled_usec" in stat:  # v2
            return {"throttled_periods": int(stat["nr_throttled"]), "throttled_ms": int(stat["throttled_usec"]) / 1e3}
        return {"throttled_periods": int(stat["nr_throttled"]), "throttled_ms": int(stat["throttled_time"]) / 1e6}
    except (OSError, KeyError, ValueError):
        return None


def cpu_steal_ms() -> float | None:
    """Milliseconds the hypervisor ran something else while this machine's CPUs wanted to run
    (`steal` in /proc/stat, summed over the CPUs, 10 ms ticks); None where there is no such
    count. Machine-wide: on a VM it tells a slow spell of the host from one of the process."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return 1e3 * int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def environment(device: str | None = None, packages: tuple[str, ...] = ()) -> dict:
    """Command, Python, platform, device and versions (torch, triton, transformers, peft, redis,
    ray, plus `packages`) of this run."""
    info = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "versions": {},
        **cpu_limits(),
    }
    for package in ("torch", "triton", "transformers", "peft", "redis", "ray", *packages):
        try:
            info["versions"][package] = version(package)
        except PackageNotFoundError:
            pass
    try:
        import torch

        from kernels.cpu_ext import cpu_flags

        info["cpu_threads"] = torch.get_num_threads()
        info["cpu"] = _cpu_model() or info["processor"]
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's kernels: AVX2, AVX512, ...
        info["cpu_flags_of_note"] = sorted(cpu_flags() & CPU_FLAGS_OF_NOTE)
        if device and device.startswith("cuda"):
            info["device"] = torch.cuda.get_device_name(torch.device(device))
        else:
            info["device"] = f"cpu ({info['cpu']}, {info['cpu_capability']}, {torch.get_num_threads()} threads)"
    except ImportError:
        info["device"] = "cpu"
    return info


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn() in milliseconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_medians_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median wall time (ms) of each fn, run round-robin so that load from other processes
    falls on every variant alike rather than on whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, format spec) pairs."""
    cells = [[format(row[key], spec) if spec else str(row[key]) for key, spec in columns] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, (key, _) in enumerate(columns)]
    print("  ".join(key.rjust(w) for (key, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
