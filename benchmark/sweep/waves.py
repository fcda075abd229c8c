"""A reproduction's graph of runs and decisions, stage by stage (shown by `reproduce --plan`)."""

from __future__ import annotations

from typing import Any

# Each stage of a task's graph, the run mode whose splits it reads, how many runs a task plan has in it, and the
# decision made from its results (a file under runs/<method>/<task>/decisions/, written once; the runs after it
# carry its hash in their identity).
STAGES = [
    ("grid points", "tune", lambda tp: tp.grid_runs,
     "the grid's winner (grid-selection.json)"),
    ("dense runs of the pruning stage", None, lambda tp: tp.dense_runs,
     "the pruning candidates' masks, computed by a worker on its device (<protocol>-prune-candidates.safetensors)"),
    ("rewind candidates", "tune", lambda tp: tp.rewind_runs,
     "the chosen candidate (<protocol>-prune-choice.json)"),
    ("final seeds", "final", lambda tp: len(tp.seeds), None),
]  # fmt: skip


def plan_waves(plan: Any) -> list[tuple[str, int, int, str | None]]:
    """(stage, runs, widest task's share, the decision made from its results) per stage of a `reproduce.Plan`
    that has runs; each stage of a task needs the decision after the one before it."""
    waves = []
    suite = plan.tasks[0].task.suite_info if plan.tasks else None
    for name, mode, count, decision in STAGES:
        runs = [count(tp) for tp in plan.tasks]
        if mode and suite:  # the splits, as the task's suite assigns them (VTAB-1k: train800 → val200, ...)
            name = f"{name} ({' → '.join(suite.modes[mode])})"
        if sum(runs):
            protocol = plan.protocol.protocol
            waves.append((name, sum(runs), max(runs), decision and decision.replace("<protocol>", protocol)))
    return waves


def describe_waves(plan: Any) -> str:
    waves = plan_waves(plan)
    lines = [
        "",
        f"the stages of each task's graph (inline, all {sum(n for _, n, _, _ in waves)} runs go one after another; "
        "with --launcher local or slurm a task's next stage is submitted as soon as its own decision exists, "
        "whatever the other tasks are doing):",
    ]
    for i, (name, runs, widest, decision) in enumerate(waves, 1):
        lines.append(f"  {i}. {name}: {runs} runs ({widest} per task at most)")
        if decision:
            lines.append(f"     → decision: {decision}")
    lines.append(
        "every decision is a file written once under runs/<method>/<task>/decisions/ and hashed into the identity "
        "of the runs after it: a changed decision makes them stale (--rerun-stale decides again and reruns them)"
    )
    return "\n".join(lines)
