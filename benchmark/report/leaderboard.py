"""Leaderboard tables and the accuracy-versus-parameters plot, generated from result JSONs with pandas.

One row per (method, protocol). Per task: mean ± std of the reported accuracy over seeds. Group means
(natural / specialized / structured) and both averages: the mean of the group means ("avg (groups)",
the VPT convention) and the plain mean over tasks ("avg (tasks)", the mean of 19 when all are there).
A group mean's std is the std over seeds of the per-seed group means; a single seed has no std (NaN:
an empty cell, never 0.0).

A row is complete when it has results on every task of the board (every task any run in the results ran).
Complete rows come first, best `avg (tasks)` first; rows that lack tasks (every run of a task failed, or
it never ran) follow, those covering more tasks first, then by their mean. Their means cover the tasks
present only, so they are not comparable with a complete row's: the tables print the count beside them
(`61.0 (3/4)`) and the page's Pareto front leaves them out, as `compare` gives no mean unless every task of it
is covered.

With `reported` the table also holds the papers' rows from the reference CSV (`benchmark/papers/reference.py`),
marked `kind` = `reported` with their source, and the plot overlays them as hollow markers (the page's tooltips
name the source). Only the rows of the backbones our runs are compared with (`benchmark.papers.backbones.run_backbone`:
a Swin-B run's method brings the Swin-B rows, never the ViT-B/16 ones) are listed; a row of a backbone other than
the default ViT-B/16 IN-21k has the backbone after its source. A run on a stand-in backbone or on synthetic tasks
(the demo) only shows where it lands against them, not whether it reproduces them (`compare` says that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.papers.backbones import DEFAULT_REFERENCE_BACKBONE, backbone_title, run_backbone
from benchmark.papers.reference import ReferenceTable, source_label
from benchmark.report.format import (
    GROUP_OF,
    GROUP_SIZES,
    SUITE_OF,
    TASK_ORDER,
    average_cell,
    count_cells,
    csv_text,
    format_mean_std,
    markdown_table,
    printed,
    protocol_label,
    sources_section,
    suites_of,
)
from benchmark.report.html import html_page, page_meta
from benchmark.report.plot import plot
from benchmark.report.suite_board import suite_markdown
from benchmark.report.variants import variant_labels
from benchmark.run.results import SUITE_FILES, atomic_write_bytes, load_results
from tasks import GROUPS, SUITES


def record_budget(record: dict[str, Any]) -> str:
    """The reproduction budget a run was planned under (`full` unless the result says otherwise)."""
    return (record.get("config") or {}).get("budget") or "full"


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: method, protocol, task, group, seed, status, acc (the reported metric), params."""
    rows = []
    variants = variant_labels(records, [(r["method"], r["protocol"], record_budget(r)) for r in records])
    for r, variant in zip(records, variants, strict=True):
        acc = r.get("val_acc") if r.get("mode") == "tune" else r.get("test_acc")
        params = r.get("params") or {}
        rows.append(
            {
                "method": r["method"],
                "protocol": r["protocol"],
                "budget": record_budget(r),
                "variant": variant,
                "task": r["task"],
                "group": r.get("group"),
                "seed": r["seed"],
                "status": r["status"],
                "acc": acc if r["status"] == "ok" else np.nan,
                "tunable": params.get("tunable"),
                "head": params.get("head"),
                "backbone": params.get("backbone"),
                "nonzero_tunable": params.get("nonzero_tunable"),
                "images_per_s": r.get("train_images_per_s"),
                "peak_memory_mb": r.get("peak_memory_mb"),
            }
        )
    columns = [
        "method",
        "protocol",
        "budget",
        "variant",
        "task",
        "group",
        "seed",
        "status",
        "acc",
        "tunable",
        "head",
        "backbone",
        "nonzero_tunable",
        "images_per_s",
        "peak_memory_mb",
    ]
    return pd.DataFrame(rows, columns=columns)


def _mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (n - 1); the std of a single value is NaN (there is no spread to speak of)."""
    values = values.dropna()
    if values.empty:
        return np.nan, np.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else np.nan


def aggregate(per_seed: pd.DataFrame, suite: str | None = None) -> dict[str, Any]:
    """Means and stds of a (seed × task) accuracy table of one suite (default: the suite of its tasks, else
    VTAB-1k): per task, per group of the suite, and both averages (for FGVC, one group: both are its mean).

    Keys: `<task>_mean/_std` for each task present; `<group>_tasks`, and for groups with tasks
    `<group>_mean/_std`; `avg_groups_mean/_std` and `avg_tasks_mean/_std`. A task's std is over its
    seeds; a group's (or an average's) is the std over the seeds present for every task of the table
    of the per-seed group means (or averages). Each `_n` key gives how many seeds that std is over.
    """
    tasks = [t for t in TASK_ORDER if t in per_seed.columns]
    row: dict[str, Any] = {}
    for task in tasks:
        row[f"{task}_mean"], row[f"{task}_std"] = _mean_std(per_seed[task])
        row[f"{task}_n"] = int(per_seed[task].notna().sum())
    # Seeds present for every task of the row: the per-seed means below average the same runs.
    complete = per_seed[tasks].dropna() if tasks else per_seed
    group_means = {}
    suite = suite or next(iter(suites_of(tasks)), "vtab1k")
    for group in SUITES[suite].groups:
        members = [t for t in tasks if GROUP_OF[t] == group]
        row[f"{group}_tasks"] = len(members)
        if members:
            row[f"{group}_mean"] = float(np.mean([row[f"{t}_mean"] for t in members]))
            group_means[group] = complete[members].mean(axis=1)
            row[f"{group}_std"] = _mean_std(group_means[group])[1]
            row[f"{group}_n"] = len(complete)
    if group_means:
        row["avg_groups_mean"] = float(np.mean([row[f"{g}_mean"] for g in group_means]))
        row["avg_groups_std"] = _mean_std(pd.concat(group_means, axis=1).mean(axis=1))[1]
        row["avg_tasks_mean"] = float(np.mean([row[f"{t}_mean"] for t in tasks]))
        row["avg_tasks_std"] = _mean_std(complete[tasks].mean(axis=1))[1]
        row["avg_groups_n"] = row["avg_tasks_n"] = len(complete)
    return row


def leaderboard_frame(runs: pd.DataFrame, suite: str | None = None) -> pd.DataFrame:
    """The numeric leaderboard of one suite's runs (`suite`: default, the suite of the runs' tasks): one row per
    (method, protocol, budget, configuration variant).

    Runs of one method under one protocol whose configurations differ (`benchmark.report.variants`) are never
    averaged together: each configuration gets its own row, its label saying what sets it apart.

    `board_tasks` is the number of tasks of the board (tasks any run ran, successfully or not), `complete`
    whether a row has results on all of them. Complete rows come first, by `avg_tasks_mean`; then the others,
    by the tasks they cover, then by `avg_tasks_mean`.
    """
    board_tasks = len({t for t in runs.task if t in TASK_ORDER}) if not runs.empty else 0
    suite = suite or next(iter(suites_of(runs.task)), "vtab1k")
    rows = []
    for (method, protocol, budget, variant), g in runs.groupby(["method", "protocol", "budget", "variant"], sort=True):
        ok = g[g.status == "ok"]
        per_seed = ok.pivot_table(index="seed", columns="task", values="acc", aggfunc="mean")
        tasks = [t for t in TASK_ORDER if t in per_seed.columns]
        row: dict[str, Any] = {
            "method": method,
            "protocol": protocol_label(protocol, per_seed.shape[0], budget) + (f" [{variant}]" if variant else ""),
            "seeds": int(per_seed.shape[0]),
            "tasks": len(tasks),
            "complete": bool(tasks) and len(tasks) == board_tasks,
            "board_tasks": board_tasks,
            "runs_failed": int((g.status != "ok").sum()),
        }
        # `<task>_n`: the seeds behind a task's mean ± std.
        stats = aggregate(per_seed, suite)
        row.update({k: v for k, v in stats.items() if not k.endswith("_n") or k[:-2] in tasks})
        params = g.dropna(subset=["tunable"])
        if not params.empty:
            row["tunable"] = float(params.groupby("task").tunable.first().mean())
            row["nonzero_tunable"] = float(params.groupby("task").nonzero_tunable.first().mean())
            row["head"] = float(params.groupby("task")["head"].first().mean())
            row["backbone"] = float(params.backbone.iloc[0])
            row["tunable_pct"] = 100.0 * row["tunable"] / row["backbone"]
        # Training throughput (median over runs) and peak memory (max over runs), where the runs carry them.
        if ok.images_per_s.notna().any():
            row["images_per_s"] = float(ok.images_per_s.median())
        if ok.peak_memory_mb.notna().any():
            row["peak_memory_mb"] = float(ok.peak_memory_mb.max())
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty and "avg_tasks_mean" in frame:
        order = ["complete", "tasks", "avg_tasks_mean", "method"]
        frame = frame.sort_values(order, ascending=[False, False, False, True], na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def reported_frame(
    reference: ReferenceTable, methods: list[str] | None = None, pairs: set[tuple[str, str]] | None = None
) -> pd.DataFrame:
    """The reference rows (of `methods`, or all; of the (method, backbone) `pairs` when given, else of the default
    backbone) in the leaderboard's columns, `kind` = `reported`; a row of another backbone than the default has
    its backbone after its source.

    Cells become `<task>_mean` (no std), the printed means the group columns, `avg_19` (FGVC: `mean`) the
    `avg_tasks_mean` column and `params_m` the `tunable` column (as printed: whether the head is
    counted differs between sources).
    """
    tasks = list(reference.layout.task_columns)
    groups = SUITES[reference.suite].groups
    headline = "avg_19" if "avg_19" in reference.layout.mean_columns else "mean"
    ref = reference.frame
    if methods is not None:
        ref = ref[ref.method.isin(methods)]
    if pairs is None:
        ref = ref[ref.backbone == DEFAULT_REFERENCE_BACKBONE]
    else:
        ref = ref[[(m, b) in pairs for m, b in zip(ref.method, ref.backbone, strict=True)]]
    rows = []
    for _, r in ref.iterrows():
        other = "" if r.backbone == DEFAULT_REFERENCE_BACKBONE else f" [{backbone_title(r.backbone)}]"
        row: dict[str, Any] = {
            "kind": "reported",
            "method": r.method,
            "protocol": r.selection_protocol,
            "source": source_label(r.source) + other,
            "source_full": r.source,
            "backbone_weights": r.backbone_weights,
            "tasks": int(r[tasks].notna().sum()),
            "complete": bool(pd.notna(r[headline])),  # the source's mean of every task
            "board_tasks": len(tasks),
        }
        row.update({f"{t}_mean": r[t] for t in tasks if pd.notna(r[t])})
        for g in groups:
            row[f"{g}_tasks"] = int(r[[t for t in tasks if GROUP_OF[t] == g]].notna().sum())
            row[f"{g}_mean"] = r[g] if g in r.index else r[headline]  # a suite of one group: its mean
        row["avg_groups_mean"] = r.avg_groups if "avg_groups" in r.index else r[headline]
        row["avg_tasks_mean"] = r[headline]
        row["tunable"] = r.params_m * 1e6 if pd.notna(r.params_m) else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["method", "avg_tasks_mean"], ascending=[True, False], na_position="last")
    return frame.reset_index(drop=True)


def with_reported(
    board: pd.DataFrame,
    reference: ReferenceTable,
    which: str = "methods",
    backbones: dict[str, set[str]] | None = None,
) -> pd.DataFrame:
    """`board` (kind `ours`) followed by the reference rows of its methods (`which="methods"`) or all rows, of the
    backbones its runs are compared with (`backbones`: method -> reference backbone ids; default: the default
    backbone for every method; `all`: every method's rows on any of those backbones)."""
    ours = board.assign(kind="ours", source="")
    methods = None if which == "all" else sorted(board.method.unique()) if not board.empty else []
    if backbones is None:
        backbones = {m: {DEFAULT_REFERENCE_BACKBONE} for m in board.method} if not board.empty else {}
    used = set().union(*backbones.values()) if backbones else {DEFAULT_REFERENCE_BACKBONE}
    if which == "all":
        pairs = {(m, b) for m in reference.frame.method for b in used}
    else:
        pairs = {(m, b) for m, found in backbones.items() for b in found}
    frame = pd.concat([ours, reported_frame(reference, methods, pairs)], ignore_index=True)
    first = ["kind", "method", "protocol", "source"]
    return frame.reindex(columns=first + [c for c in frame.columns if c not in first])


def markdown(board: pd.DataFrame) -> str:
    """The leaderboard as a Markdown document (with `kind` and `source` columns when it holds reported rows)."""
    tasks = [t for t in TASK_ORDER if f"{t}_mean" in board.columns]
    reported = "kind" in board.columns
    lines = [
        "# Leaderboard",
        "",
        "Top-1 accuracy (%) as mean ± std over seeds (a single seed shows its mean alone: it has no std). "
        "`avg (groups)` is the mean of the three group means (VPT convention); `avg (tasks)` the plain mean over "
        "the tasks present (the mean of 19 when complete). A group mean covering fewer tasks than the group has "
        "shows the count in brackets. Rows with results on every task of this board come first, by `avg (tasks)`; "
        "rows lacking tasks follow, their averages marked with the tasks they cover (`61.0 (3/4)`): such a mean "
        "is not comparable with a complete row's. `tunable` excludes the head; `nonzero` counts what survives "
        "pruning; `%` is tunable / backbone. Generated by `python -m benchmark leaderboard`; do not edit.",
        "",
    ]
    if reported:
        lines += [
            "Rows of kind `reported` are published numbers (`results/reference/vtab1k_reported.csv`): ViT-B/16 "
            "(IN-21k) on the real VTAB-1k, produced by the protocol in their `protocol` column, `tunable` as the "
            "source prints it (whether the head is counted differs). They are context, not a result of this run; "
            "`python -m benchmark compare` puts them beside ours task by task and says which protocols differ.",
            "",
        ]
    summary = []
    for _, r in board.iterrows():
        ours = not reported or r.kind == "ours"
        row = {"kind": r.kind} if reported else {}
        row.update({"method": r.method, "protocol": r.protocol})
        if reported:
            row["source"] = r.source
        row["tasks"] = f"{r.tasks}/19" if ours or r.tasks else "—"
        cell = format_mean_std if ours else lambda mean, std: printed(mean)
        for g in GROUPS:
            text = cell(r.get(f"{g}_mean"), r.get(f"{g}_std"))
            n = r.get(f"{g}_tasks", 0)
            row[g] = text if n in (0, GROUP_SIZES[g]) or text == "—" else f"{text} ({n}/{GROUP_SIZES[g]})"
        row["avg (groups)"] = average_cell(cell(r.get("avg_groups_mean"), r.get("avg_groups_std")), r)
        row["avg (tasks)"] = average_cell(cell(r.get("avg_tasks_mean"), r.get("avg_tasks_std")), r)
        row.update(count_cells(r, ours))
        summary.append(row)
    lines += [markdown_table(summary) if summary else "(no results)", ""]
    if tasks and not board.empty:
        lines += ["## Per task", ""]
        per_task = []
        for _, r in board.iterrows():
            row = {"kind": r.kind} if reported else {}
            row.update({"method": r.method, "protocol": r.protocol})
            if reported:
                row["source"] = r.source
            if reported and r.kind == "reported":
                row.update({t: printed(r.get(f"{t}_mean")) for t in tasks})
            else:
                row.update({t: format_mean_std(r.get(f"{t}_mean"), r.get(f"{t}_std")) for t in tasks})
            per_task.append(row)
        lines += [markdown_table(per_task), ""]
    lines += sources_section(board) if reported else []
    return "\n".join(lines)


def run_backbones(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per method, the reference backbones its runs are compared with (`backbones.run_backbone`; runs on a backbone
    no reported row uses add none)."""
    found: dict[str, set[str]] = {}
    for r in records:
        backbone = run_backbone(r.get("config") or {})
        found.setdefault(r["method"], set()).update({backbone} if backbone else set())
    return found


def records_by_suite(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records of each suite with results, in `SUITES` order (a task no suite knows counts as VTAB-1k's)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        found.setdefault(SUITE_OF.get(r.get("task"), "vtab1k"), []).append(r)
    return {s: found[s] for s in SUITES if s in found}


def write_leaderboards(
    results: Path,
    *,
    reference: ReferenceTable | dict[str, ReferenceTable] | None = None,
    reported: str = "methods",
    suite: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Regenerate the leaderboard under `results`: a board per suite with results (or only `suite`'s), never
    mixing suites; return them.

    Files: `leaderboard.md` and `leaderboard.html` hold every board written (VTAB-1k's first, as it always was);
    each suite has its CSV and plot (VTAB-1k: `leaderboard.csv`, `accuracy_vs_params.png`; FGVC:
    `leaderboard-fgvc.csv`, `accuracy_vs_params-fgvc.png`). With `reference` (one table, or one per suite),
    a board also holds that suite's reported rows: those of the methods in the results (`reported="methods"`)
    or all of them (`"all"`). Every file's content is built before the first one is written, so bad input
    leaves the previous files as they were.
    """
    results = Path(results)
    records = load_results(results)
    by_suite = records_by_suite(records)
    suites = [suite] if suite else list(by_suite) or ["vtab1k"]
    tables = {reference.suite: reference} if isinstance(reference, ReferenceTable) else dict(reference or {})
    boards: dict[str, pd.DataFrame] = {}
    for s in suites:
        board = leaderboard_frame(runs_frame(by_suite.get(s, [])), s)
        if s in tables:
            board = with_reported(board, tables[s], reported, run_backbones(by_suite.get(s, [])))
        boards[s] = board
    shown = [r for s in suites for r in by_suite.get(s, [])]
    texts = [markdown(b) if s == "vtab1k" else suite_markdown(b, s) for s, b in boards.items()]
    files = {"leaderboard.md": "\n".join(texts).encode()}
    for s, board in boards.items():
        csv_name, png_name = SUITE_FILES[s]
        files[csv_name], files[png_name] = csv_text(board).encode(), plot(board, SUITES[s].title)
    files["leaderboard.html"] = html_page(boards, page_meta(shown)).encode()
    for name, data in files.items():
        atomic_write_bytes(results / name, data)
    return boards


def write_leaderboard(
    results: Path, *, reference: ReferenceTable | dict[str, ReferenceTable] | None = None, reported: str = "methods"
) -> pd.DataFrame:
    """`write_leaderboards` for every suite with results; return VTAB-1k's board (else the first one written)."""
    boards = write_leaderboards(results, reference=reference, reported=reported)
    return boards.get("vtab1k", next(iter(boards.values())))
