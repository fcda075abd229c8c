"""Linux and macOS: the CPU count, peak memory in MiB and the `/proc` readers, each tested by faking the platform
where the code branches (no `os.sched_getaffinity`, `sys.platform == "darwin"`, no `/proc`). Each test failed on
the code before its fix."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmark.cli import main
from benchmark.core import platform
from benchmark.perf import timing
from benchmark.run import runner
from benchmark.sweep import launch
from tests.test_trust import bench_args

ROOT = Path(__file__).resolve().parent.parent


def like_macos_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int = 6) -> None:
    """macOS: no affinity mask; `os.process_cpu_count` only from Python 3.13."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)


def fake_rusage(monkeypatch: pytest.MonkeyPatch, value: list[int]) -> None:
    """`resource.getrusage` reporting `value[0]` as `ru_maxrss` (a list, so a test can raise it)."""
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=value[0]))


def without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system without `/proc` (macOS): opening anything under it fails as it would there."""
    real_open, real_access = builtins.open, os.access

    def no_proc_open(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc_open)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not str(path).startswith("/proc") and
                        real_access(path, mode, **kw))  # fmt: skip


# -- CPU count ---------------------------------------------------------------------------------------------------
def test_launch_options_without_sched_getaffinity(monkeypatch):
    """`launch_options` ran `os.sched_getaffinity` for every bench, inline included: AttributeError on macOS."""
    like_macos_cpus(monkeypatch, cpus=6)
    monkeypatch.setattr(launch, "visible_gpus", lambda: [])
    inline = launch.launch_options(argparse.Namespace(launcher="inline", threads=None))
    assert inline.launcher == "inline"
    local = launch.launch_options(
        argparse.Namespace(launcher="local", workers=2, runs_per_gpu=None, threads=None)
    )  # 6 CPUs over 2 workers
    assert (local.workers, local.threads) == (2, 3)


def test_usable_cpus_prefers_the_affinity_mask_then_process_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert platform.usable_cpus() == 3  # Linux: a SLURM job's or taskset's CPUs, not the machine's
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "process_cpu_count", lambda: 5, raising=False)
    assert platform.usable_cpus() == 5  # Python 3.13+ elsewhere
    monkeypatch.delattr(os, "process_cpu_count")
    assert platform.usable_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "cannot be determined"
    assert platform.usable_cpus() == 1


def test_bench_runs_where_there_is_no_sched_getaffinity(synth_root, tmp_path, monkeypatch):
    """`make demo`'s path on macOS: an inline bench trains and records its run."""
    like_macos_cpus(monkeypatch)
    results = tmp_path / "r"
    assert main(bench_args(synth_root, results)) == 0
    record = json.loads((results / "runs" / "linear" / "svhn" / "final-s42.json").read_text())
    assert record["status"] == "ok" and record["peak_memory_mb"] > 0


def test_makefile_counts_cores_without_nproc(tmp_path):
    """`nproc` is GNU coreutils; macOS has `getconf`. DEMO_JOBS fell back to 1 without nproc."""
    make, getconf = shutil.which("make"), shutil.which("getconf")
    if not make or not getconf:
        pytest.skip("make or getconf is not installed")
    cores = int(subprocess.run([getconf, "_NPROCESSORS_ONLN"], capture_output=True, text=True).stdout)
    if cores < 2:
        pytest.skip("one core: DEMO_JOBS is 1 with or without nproc")
    bin_dir = tmp_path / "bin"  # a PATH holding getconf and no nproc
    bin_dir.mkdir()
    (bin_dir / "getconf").symlink_to(getconf)
    out = subprocess.run(
        [make, "-s", "--no-print-directory", "-f", str(ROOT / "Makefile"), "--eval",
         "show-jobs: ; $(info jobs=$(DEMO_JOBS))", "show-jobs"],
        capture_output=True, text=True, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"jobs={min(cores, 2)}"


# -- peak memory -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("system", "ru_maxrss"), [("linux", 512 * 2**10), ("darwin", 512 * 2**20)])
def test_a_runs_peak_memory_is_in_mib_on_linux_and_macos(monkeypatch, system, ru_maxrss):
    """`ru_maxrss` is KiB on Linux and bytes on macOS: 512 MiB either way (macOS read 1024x too high)."""
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_rusage(monkeypatch, [ru_maxrss])
    assert runner._peak_memory() == (512.0, "process peak RSS")
    assert platform.peak_rss_mib() == 512.0


def test_perf_memory_without_proc_falls_back_to_the_process_peak(monkeypatch):
    """Without `/proc`, `perf` measured no memory at all and its report still claimed per-phase VmHWM."""
    without_proc(monkeypatch)
    monkeypatch.setattr(sys, "platform", "darwin")
    peak = [300 * 2**20]  # bytes, as macOS reports it
    fake_rusage(monkeypatch, peak)
    cpu = torch.device("cpu")
    memory = timing.PeakMemory(cpu)

    def step() -> None:  # a training step that raises the process's peak by 64 MiB
        peak[0] += 64 * 2**20

    candidate = timing.Candidate("m", "method", timing.Variant(), 197, step)
    before = memory.current()
    timing.measure_memory(candidate, memory, before)
    assert (before, candidate.memory_mb) == (300.0, 64.0)
    # The report says what was measured: the rise of the process's peak, not a per-phase one.
    assert "ru_maxrss" in memory.kind and "VmHWM" not in memory.kind and timing.memory_kind(cpu) == memory.kind
    assert platform.proc_status_mib("VmRSS") is None and not platform.reset_peak_rss()


def test_perf_memory_with_proc_is_per_phase():
    """On Linux the per-phase high-water mark is read from `/proc` and reset through `clear_refs`."""
    if not os.path.exists("/proc/self/clear_refs") or not platform.reset_peak_rss():
        pytest.skip("no writable /proc/self/clear_refs here")
    memory = timing.PeakMemory(torch.device("cpu"))
    assert "VmHWM" in memory.kind and memory.kind == timing.memory_kind(torch.device("cpu"))
    assert memory.current() == pytest.approx(platform.proc_status_mib("VmRSS"), abs=8)
