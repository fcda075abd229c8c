"""The waves a reproduction runs in under `--launcher local|slurm` (shown by `reproduce --plan`)."""

from __future__ import annotations

from typing import Any


def plan_waves(plan: Any) -> list[tuple[str, int, int]]:
    """(stage, runs, widest task's share) per wave of a `reproduce.Plan`: each wave needs the one before it."""
    stages = [
        ("grid points (train800 → val200)", lambda tp: tp.grid_runs),
        ("dense runs of the pruning stage", lambda tp: tp.dense_runs),
        ("rewind candidates (train800 → val200)", lambda tp: tp.rewind_runs),
        ("final seeds (train800val200 → test)", lambda tp: len(tp.seeds)),
    ]
    waves = []
    for name, count in stages:
        runs = [count(tp) for tp in plan.tasks]
        if sum(runs):
            waves.append((name, sum(runs), max(runs)))
    return waves


def describe_waves(plan: Any) -> str:
    waves = plan_waves(plan)
    lines = [
        "",
        f"waves (with --launcher local or slurm, each wave is one job array, submitted once the results of the "
        f"one before it exist; inline runs the same {sum(n for _, n, _ in waves)} runs one after another):",
    ]
    for i, (name, runs, widest) in enumerate(waves, 1):
        lines.append(f"  {i}. {name}: {runs} runs ({widest} per task at most)")
    return "\n".join(lines)
