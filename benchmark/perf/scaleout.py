"""`perf --scaleout`: wall time of one synthetic sweep with 1, 2, ... local workers, side by side.

Each worker is one process with one torch thread, so on a machine with N free cores N workers should
run close to N times as many runs per minute; what is left is each wave's worker start-up (imports, the
backbone, decoding the task) and runs of unequal length at the end of a wave. The machine's load average
before and after each sweep is recorded: other processes on the same cores slow the workers down. The sweep: `runs` final
runs of VPT-deep (4 prompt tokens) on the tiny `test_vit`, over synthetic 32-px svhn and eurosat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmark.perf.files import machine, write_measurement

# One single-thread process's matmul throughput (a fixed time, counted): the machine's ceiling for n workers
# is the sum over n of them side by side, relative to one alone.
SPIN = """
import time, torch
torch.set_num_threads(1)
a, n, t = torch.randn(256, 256), 0, time.perf_counter()
while time.perf_counter() - t < {seconds}:
    a @ a
    n += 1
print(n)
"""
TASKS = ("svhn", "eurosat")  # 10 classes each: runs of equal length


def ceiling(n: int, seconds: float = 5.0) -> float:
    """Matmuls per second of n single-thread processes side by side, summed."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(n)]  # fmt: skip
    return sum(int(p.communicate()[0]) for p in procs) / seconds


def measure(workers: list[int], *, runs: int, epochs: int, out: Path, say=print) -> tuple[Path, Path]:
    """Run the same sweep once per worker count (fresh results each time); write the table under `out`."""
    from tasks import get_task
    from tasks.synth import SynthConfig, write_task

    seeds = ",".join(str(42 + i) for i in range((runs + len(TASKS) - 1) // len(TASKS)))
    rows: list[dict[str, Any]] = []
    accuracies = []
    with tempfile.TemporaryDirectory(prefix="peft-bench-scaleout-") as tmp:
        root = Path(tmp) / "data"
        for task in TASKS:
            write_task(root, get_task(task), SynthConfig(per_class=32, image_size=32, seed=0))
        for n in workers:
            results = Path(tmp) / f"results-{n}"
            args = ["bench", "--method", "vpt_deep", "--tasks", ",".join(TASKS), "--seeds", seeds,
                    "--data-root", str(root), "--results", str(results), "--backbone", "test_vit", "--no-pretrained",
                    "--image-size", "32", "--epochs", str(epochs), "--batch-size", "16", "--set", "num_tokens=4",
                    "--launcher", "local", "--workers", str(n), "--threads", "1", "--quiet"]  # fmt: skip
            load = os.getloadavg()[0]
            say(f"scaleout: {n} worker(s) ...")
            t0 = time.perf_counter()
            if subprocess.run([sys.executable, "-m", "benchmark", *args]).returncode != 0:
                raise RuntimeError(f"the sweep with {n} worker(s) failed")
            wall = time.perf_counter() - t0
            records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("final-s*.json"))]
            accuracies.append([r["test_acc"] for r in records])
            rows.append({
                "workers": n, "runs": len(records), "wall_s": round(wall, 1),
                "runs_per_min": round(60 * len(records) / wall, 2),
                "mean_run_s": round(sum(r["wall_time_s"] for r in records) / len(records), 1),
                "load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            })  # fmt: skip
    one = ceiling(1)
    for row in rows:
        row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
        row["ceiling"] = round(ceiling(row["workers"]) / one, 2)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "sweep": f"vpt_deep (4 tokens) on test_vit 32 px, {len(TASKS)} synthetic tasks, {epochs} epochs, "
        f"seeds {seeds}: {rows[0]['runs']} runs",
        "identical_results": all(a == accuracies[0] for a in accuracies),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    return write_measurement(out, "scaleout-cpu", report, markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Local workers: one sweep, side by side ({report['date']})",
        "",
        f"Machine: {report['machine']}. Sweep: {report['sweep']}. One torch thread per worker. "
        f"Results identical across worker counts: {'yes' if report['identical_results'] else 'NO'}. Machine "
        "ceiling: the summed matmul throughput of as many single-thread processes side by side, relative to "
        "one alone, measured right after the sweeps (what the cores left to us allow).",
        "",
        "| workers | runs | wall time (s) | runs / min | mean run (s) | speed-up | machine ceiling | "
        "load before / after (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['workers']} | {r['runs']} | {r['wall_s']} | {r['runs_per_min']} | {r['mean_run_s']} | "
                     f"{r['speedup']}× | {r['ceiling']}× | {r['load_1min_before']} / {r['load_1min_after']} |")  # fmt: skip
    return "\n".join(lines)
