"""The machine this process runs on, read the same way on Linux and macOS: the CPUs it may use, its peak
resident memory, and Linux's `/proc/self` where there is one (every reader says when there is not)."""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from collections.abc import Callable

PROC_SELF = "/proc/self"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS keeps one (Linux; a SLURM job or
    `taskset` narrows it), else `os.process_cpu_count()` (Python 3.13+), else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    count = getattr(os, "process_cpu_count", os.cpu_count)
    return count() or 1


def peak_rss_mib() -> float:
    """The process's peak resident memory since it started, in MiB (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def proc_status_mib(key: str) -> float | None:
    """A memory line of `/proc/self/status` (`VmRSS`: resident now, `VmHWM`: its high-water mark) in MiB;
    None where there is no `/proc` (macOS) or no such line."""
    try:
        with open(f"{PROC_SELF}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None


def can_reset_peak_rss() -> bool:
    """Whether `/proc/self/clear_refs` exists and may be written (Linux), so `reset_peak_rss` can work."""
    return os.access(f"{PROC_SELF}/clear_refs", os.W_OK) and proc_status_mib("VmHWM") is not None


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (`VmHWM`) through `/proc/self/clear_refs`; False where that cannot
    be done (no `/proc`, or a kernel or container that refuses the write)."""
    try:
        with open(f"{PROC_SELF}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim` (hands freed heap memory back to the system); None where the C library has none
    (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the symbols the process already loaded
    except OSError:
        return None
