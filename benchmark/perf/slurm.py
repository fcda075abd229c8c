"""`perf --slurm`: what the SLURM driver costs on the cluster it runs on.

1. `squeue` calls per minute of a driver with 1 and with 50 jobs in the queue: a counting `squeue` first
   on the driver's PATH logs every call; the jobs are held pending (`--begin` an hour later) so the count
   is taken with the queue in a steady state; the driver is then interrupted, which cancels its jobs.
2. Overhead per run with K runs per job (`--runs-per-job`): wall time of a sweep of tiny runs, divided by
   the runs and by the jobs the partition runs at once, minus the runs' own mean wall time (what each run
   records): the queue, the job's start-up, imports, the backbone and the data, and the driver's polls.

The sweeps: final runs of `linear` on the tiny `test_vit`, on a synthetic 32-px camelyon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmark.perf.files import machine, write_measurement
from benchmark.sweep.driver import SLURM_POLL_S

COUNTING_SQUEUE = """#!/bin/sh
date +%s.%N >> {log}
exec {real} "$@"
"""


def _sweep_args(root: Path, results: Path, runs: int, epochs: int, *extra: str) -> list[str]:
    seeds = ",".join(str(1 + i) for i in range(runs))
    return [sys.executable, "-m", "benchmark", "bench", "--method", "linear", "--tasks", "camelyon", "--seeds", seeds,
            "--data-root", str(root), "--results", str(results), "--backbone", "test_vit", "--no-pretrained",
            "--image-size", "32", "--epochs", str(epochs), "--batch-size", "16", "--quiet", "--launcher", "slurm",
            "--slurm-gpus-per-job", "0", "--slurm-time", "30", "--threads", "1", *extra]  # fmt: skip


def squeue_rate(jobs: int, seconds: float, root: Path, tmp: Path) -> dict[str, Any]:
    """squeue calls per minute of one driver with `jobs` pending jobs, counted over `seconds`."""
    bin_dir, log = tmp / f"bin-{jobs}", tmp / f"squeue-{jobs}.log"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(COUNTING_SQUEUE.format(log=log, real=shutil.which("squeue")))
    (bin_dir / "squeue").chmod(0o755)
    log.touch()
    results = tmp / f"rate-{jobs}"
    args = _sweep_args(root, results, jobs, 1, "--slurm-cpus-per-job", "1", "--slurm-extra", "begin=now+60minutes")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not list((results / "logs").rglob("*_submitted.pkl")):  # counted from the submission on
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the driver did not submit: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.5)
        start = time.time()
        time.sleep(seconds)
        stamps = [float(x) for x in log.read_text().split()]
    finally:
        proc.send_signal(signal.SIGINT)  # the driver cancels its jobs
        proc.wait(timeout=120)
    counted = [t for t in stamps if start <= t < start + seconds]
    return {"jobs": jobs, "seconds": seconds, "squeue_calls": len(counted),
            "per_minute": round(60 * len(counted) / seconds, 2)}  # fmt: skip


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
    return int(re.match(r"\d+", out.stdout.strip()).group())


def run_overhead(per_job: int, runs: int, epochs: int, root: Path, tmp: Path) -> dict[str, Any]:
    """Overhead per run of a sweep of `runs` runs packed `per_job` to a job, one job at a time on a node
    (each job asks for all its CPUs)."""
    results = tmp / f"overhead-{per_job}"
    cpus = node_cpus()
    args = _sweep_args(root, results, runs, epochs, "--slurm-cpus-per-job", str(cpus), "--runs-per-job",
                       str(per_job))  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"the sweep with --runs-per-job {per_job} failed: {out.stderr[-2000:]}")
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("final-s*.json"))]
    mean_run = sum(r["wall_time_s"] for r in records) / len(records)
    return {"runs_per_job": per_job, "runs": len(records), "jobs": -(-len(records) // per_job),
            "wall_s": round(wall, 1), "mean_run_s": round(mean_run, 2),
            "overhead_per_run_s": round(wall / len(records) - mean_run, 2)}  # fmt: skip


def measure(*, runs: int, epochs: int, out: Path, seconds: float = 60.0, say=print) -> tuple[Path, Path]:
    from tasks import get_task
    from tasks.synth import SynthConfig, write_task

    with tempfile.TemporaryDirectory(prefix="peft-bench-slurm-") as name:
        tmp = Path(name)
        root = tmp / "data"
        write_task(root, get_task("camelyon"), SynthConfig(per_class=32, image_size=32, seed=0))
        rates = []
        for jobs in (1, 50):
            say(f"slurm: squeue calls of a driver with {jobs} queued job(s), over {seconds:.0f} s ...")
            rates.append(squeue_rate(jobs, seconds, root, tmp))
        overheads = []
        for per_job in (1, 8):
            say(f"slurm: {runs} runs, {per_job} per job ...")
            overheads.append(run_overhead(per_job, runs, epochs, root, tmp))
    version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{machine()}; {version}, one node with {node_cpus()} CPUs",
        "poll_s": SLURM_POLL_S,
        "sweep": f"linear on test_vit 32 px, synthetic camelyon, {epochs} epoch(s) per run",
        "squeue": rates,
        "overhead": overheads,
    }
    out.mkdir(parents=True, exist_ok=True)
    return write_measurement(out, "slurm-driver", report, markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# The SLURM driver's cost ({report['date']})",
        "",
        f"Machine: {report['machine']}. The driver polls every {report['poll_s']:.0f} s; each poll asks one "
        "`squeue --me` for the whole sweep. Measured by `python -m benchmark perf --slurm`.",
        "",
        "| jobs in the queue | squeue calls | over (s) | calls / min |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['jobs']} | {r['squeue_calls']} | {r['seconds']:.0f} | {r['per_minute']} |" for r in report["squeue"]
    ]
    lines += [
        "",
        f"Overhead per run: {report['sweep']}; one job at a time (each job asks for all the node's CPUs); "
        "overhead = wall time / runs − the runs' mean wall time.",
        "",
        "| runs per job | runs | jobs | sweep wall time (s) | mean run (s) | overhead per run (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['runs_per_job']} | {r['runs']} | {r['jobs']} | {r['wall_s']} | {r['mean_run_s']} | "
              f"{r['overhead_per_run_s']} |" for r in report["overhead"]]  # fmt: skip
    return "\n".join(lines)
