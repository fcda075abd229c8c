"""Leaderboard tables and the accuracy-versus-parameters plot, generated from result JSONs with pandas.

One row per (method, protocol). Per task: mean ± std of the reported accuracy over seeds. Group means
(natural / specialized / structured) and both averages: the mean of the group means ("avg (groups)",
the VPT convention) and the plain mean over tasks ("avg (tasks)", the mean of 19 when all are there).
A group mean's std is the std over seeds of the per-seed group means. When a row lacks tasks, its
group means cover the tasks present, and the `tasks` column says how many that is.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from benchmark.results import atomic_write_bytes, load_results
from tasks import GROUPS, TASKS

TASK_ORDER = [t.id for t in TASKS]
GROUP_SIZES = {g: sum(t.group == g for t in TASKS) for g in GROUPS}


def protocol_label(protocol: str, n_seeds: int) -> str:
    """How a row's numbers were produced, in the vocabulary of the reference table."""
    seeds = f"{n_seeds}seed" + ("s" if n_seeds != 1 else "")
    return {
        "grid": f"val-tuned-last-epoch-{seeds}",
        "final": f"fixed-hparams-last-epoch-{seeds}",
        "tune": f"val200-last-epoch-{seeds}",
    }[protocol]


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: method, protocol, task, group, seed, status, acc (the reported metric), params."""
    rows = []
    for r in records:
        acc = r.get("val_acc") if r.get("mode") == "tune" else r.get("test_acc")
        params = r.get("params") or {}
        rows.append(
            {
                "method": r["method"],
                "protocol": r["protocol"],
                "task": r["task"],
                "group": r.get("group"),
                "seed": r["seed"],
                "status": r["status"],
                "acc": acc if r["status"] == "ok" else np.nan,
                "tunable": params.get("tunable"),
                "head": params.get("head"),
                "backbone": params.get("backbone"),
                "nonzero_tunable": params.get("nonzero_tunable"),
            }
        )
    columns = [
        "method",
        "protocol",
        "task",
        "group",
        "seed",
        "status",
        "acc",
        "tunable",
        "head",
        "backbone",
        "nonzero_tunable",
    ]
    return pd.DataFrame(rows, columns=columns)


def _mean_std(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    if values.empty:
        return np.nan, np.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def leaderboard_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """The numeric leaderboard: one row per (method, protocol)."""
    rows = []
    for (method, protocol), g in runs.groupby(["method", "protocol"], sort=True):
        ok = g[g.status == "ok"]
        per_seed = ok.pivot_table(index="seed", columns="task", values="acc", aggfunc="mean")
        tasks = [t for t in TASK_ORDER if t in per_seed.columns]
        row: dict[str, Any] = {
            "method": method,
            "protocol": protocol_label(protocol, per_seed.shape[0]),
            "seeds": int(per_seed.shape[0]),
            "tasks": len(tasks),
            "runs_failed": int((g.status != "ok").sum()),
        }
        for task in tasks:
            row[f"{task}_mean"], row[f"{task}_std"] = _mean_std(per_seed[task])
        group_of = {t.id: t.group for t in TASKS}
        # Seeds present for every task of the row: the per-seed means below average the same runs.
        complete = per_seed[tasks].dropna() if tasks else per_seed
        group_means = {}
        for group in GROUPS:
            members = [t for t in tasks if group_of[t] == group]
            row[f"{group}_tasks"] = len(members)
            if members:
                row[f"{group}_mean"] = float(np.mean([row[f"{t}_mean"] for t in members]))
                group_means[group] = complete[members].mean(axis=1)
                row[f"{group}_std"] = _mean_std(group_means[group])[1]
        if group_means:
            row["avg_groups_mean"] = float(np.mean([row[f"{g}_mean"] for g in group_means]))
            row["avg_groups_std"] = _mean_std(pd.concat(group_means, axis=1).mean(axis=1))[1]
            row["avg_tasks_mean"] = float(np.mean([row[f"{t}_mean"] for t in tasks]))
            row["avg_tasks_std"] = _mean_std(complete[tasks].mean(axis=1))[1]
        params = g.dropna(subset=["tunable"])
        if not params.empty:
            row["tunable"] = float(params.groupby("task").tunable.first().mean())
            row["nonzero_tunable"] = float(params.groupby("task").nonzero_tunable.first().mean())
            row["head"] = float(params.groupby("task")["head"].first().mean())
            row["backbone"] = float(params.backbone.iloc[0])
            row["tunable_pct"] = 100.0 * row["tunable"] / row["backbone"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty and "avg_tasks_mean" in frame:
        frame = frame.sort_values(["avg_tasks_mean", "method"], ascending=[False, True], na_position="last")
    return frame.reset_index(drop=True)


def _cell(mean: Any, std: Any) -> str:
    if mean is None or pd.isna(mean):
        return "—"
    return f"{mean:.1f}" if pd.isna(std) or std == 0 else f"{mean:.1f} ± {std:.1f}"


def _count(n: Any) -> str:
    if n is None or pd.isna(n):
        return "—"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{round(n):,}"


def markdown(board: pd.DataFrame) -> str:
    """The leaderboard as a Markdown document."""
    tasks = [t for t in TASK_ORDER if f"{t}_mean" in board.columns]
    lines = [
        "# Leaderboard",
        "",
        "Top-1 accuracy (%) as mean ± std over seeds. `avg (groups)` is the mean of the three group means "
        "(VPT convention); `avg (tasks)` the plain mean over the tasks present (the mean of 19 when complete). "
        "A group mean covering fewer tasks than the group has shows the count in brackets. `tunable` excludes "
        "the head; `nonzero` counts what survives pruning; `%` is tunable / backbone. Generated by `python -m benchmark leaderboard`; do not edit.",
        "",
    ]
    summary = []
    for _, r in board.iterrows():
        row = {"method": r.method, "protocol": r.protocol, "tasks": f"{r.tasks}/19"}
        for g in GROUPS:
            cell = _cell(r.get(f"{g}_mean"), r.get(f"{g}_std"))
            n = r.get(f"{g}_tasks", 0)
            row[g] = cell if n in (0, GROUP_SIZES[g]) or cell == "—" else f"{cell} ({n}/{GROUP_SIZES[g]})"
        row["avg (groups)"] = _cell(r.get("avg_groups_mean"), r.get("avg_groups_std"))
        row["avg (tasks)"] = _cell(r.get("avg_tasks_mean"), r.get("avg_tasks_std"))
        row["tunable"] = _count(r.get("tunable"))
        row["nonzero"] = _count(r.get("nonzero_tunable"))
        row["%"] = "—" if pd.isna(r.get("tunable_pct", np.nan)) else f"{r.tunable_pct:.3f}"
        row["head"] = _count(r.get("head"))
        row["failed"] = int(r.runs_failed)
        summary.append(row)
    lines += [pd.DataFrame(summary).to_markdown(index=False) if summary else "(no results)", ""]
    if tasks and not board.empty:
        lines += ["## Per task", ""]
        per_task = [
            {
                "method": r.method,
                "protocol": r.protocol,
                **{t: _cell(r.get(f"{t}_mean"), r.get(f"{t}_std")) for t in tasks},
            }
            for _, r in board.iterrows()
        ]
        lines += [pd.DataFrame(per_task).to_markdown(index=False), ""]
    return "\n".join(lines)


def plot(board: pd.DataFrame) -> bytes:
    """Mean accuracy over tasks against trained parameters (tunable + head, log axis), one point per row."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    has = {"avg_tasks_mean", "tunable"} <= set(board.columns)
    shown = board.dropna(subset=["avg_tasks_mean", "tunable"]) if has else board.iloc[0:0]
    for _, r in shown.iterrows():
        x = r.tunable + r["head"]
        ax.scatter([x], [r.avg_tasks_mean], s=40, zorder=3)
        ax.annotate(
            f"{r.method} ({r.tasks} tasks)",
            (x, r.avg_tasks_mean),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("trained parameters per task (method + head, log scale)")
    ax.set_ylabel("mean top-1 accuracy over tasks (%)")
    ax.set_title("Accuracy vs. trained parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_leaderboard(results: Path) -> pd.DataFrame:
    """Regenerate `leaderboard.md`, `leaderboard.csv` and `accuracy_vs_params.png` under `results`.

    Files whose content would not change are left untouched.
    """
    results = Path(results)
    board = leaderboard_frame(runs_frame(load_results(results)))
    atomic_write_bytes(results / "leaderboard.md", markdown(board).encode())
    atomic_write_bytes(results / "leaderboard.csv", board.to_csv(index=False, float_format="%.4f").encode())
    atomic_write_bytes(results / "accuracy_vs_params.png", plot(board))
    return board
