"""The accuracy-versus-parameters plot of a leaderboard, as PNG (matplotlib); the page draws its own as SVG."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from benchmark.report.format import incomplete, trained_params

# What a suite's reported rows print as their mean (the plot's y for them).
HEADLINE = {"VTAB-1k": "mean of 19", "FGVC": "mean of 5"}


def plot(board: pd.DataFrame, suite_title: str = "VTAB-1k") -> bytes:
    """Mean accuracy over tasks against trained parameters (log axis), one point per row.

    Our rows are filled markers at tunable + head; reported rows (`kind` = `reported`) are hollow
    markers in the same colour as our row of that method, at the printed parameter count and the mean
    of 19, labelled with their source. Incomplete rows of ours (`complete` false: their mean covers fewer
    tasks) are faint and labelled with their count. Rows without a positive parameter count cannot be placed on the
    log axis and are left out (the table still lists them).
    """
    fig, ax = plt.subplots(figsize=(8, 5) if "kind" in board.columns else (7, 4.5), dpi=120)
    has = {"avg_tasks_mean", "tunable"} <= set(board.columns)
    shown = board.dropna(subset=["avg_tasks_mean", "tunable"]) if has else board.iloc[0:0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: colours[i % len(colours)] for i, m in enumerate(sorted(board.method.unique()))} if has else {}
    any_reported = any_incomplete = False
    placed: list[tuple[float, float]] = []
    span = max(1.0, float(shown.avg_tasks_mean.max() - shown.avg_tasks_mean.min())) if len(shown) else 1.0
    for _, r in shown.iterrows():
        x = trained_params(r)
        if x <= 0:
            continue
        # Labels of points that nearly coincide (e.g. one paper's numbers quoted with different parameter
        # counts) are stacked instead of printed over each other.
        near = sum(abs(np.log10(x) - px) < 0.8 and abs(r.avg_tasks_mean - py) < 0.03 * span for px, py in placed)
        placed.append((float(np.log10(x)), float(r.avg_tasks_mean)))
        offset = (5, 4 + 9 * near)
        if r.get("kind", "ours") == "reported":
            any_reported = True
            ax.scatter([x], [r.avg_tasks_mean], s=46, facecolors="none", edgecolors=colour[r.method],
                       linewidths=1.4, zorder=2)  # fmt: skip
            label, size, tint = f"{r.method} ({r.source})", 6.5, "0.35"
        elif incomplete(r):
            any_incomplete = True
            ax.scatter([x], [r.avg_tasks_mean], s=40, color=colour[r.method], alpha=0.35, zorder=3)
            label, size, tint = f"{r.method} ({r.tasks}/{r.board_tasks} tasks: incomplete)", 7, "0.45"
        else:
            ax.scatter([x], [r.avg_tasks_mean], s=40, color=colour[r.method], zorder=3)
            label, size, tint = f"{r.method} ({r.tasks} tasks)", 8, "black"
        # Labels are plain text: a `$` in a method name is no mathtext formula (an unpaired one would not draw).
        ax.annotate(label, (x, r.avg_tasks_mean), textcoords="offset points", xytext=offset, fontsize=size,
                    color=tint, usetex=False, parse_math=False)  # fmt: skip
    if any_reported or any_incomplete:
        dot = {"marker": "o", "linestyle": "", "color": "0.3"}
        handles = [plt.Line2D([], [], **dot, label="ours: mean over the board's tasks")]
        if any_incomplete:
            label = "ours, incomplete: mean over fewer tasks (not comparable)"
            handles.append(plt.Line2D([], [], **dot, alpha=0.35, label=label))
        if any_reported:
            label = f"reported (ViT-B/16, real {suite_title}): {HEADLINE.get(suite_title, 'mean')}, params as printed"
            handles.append(plt.Line2D([], [], **dot, markerfacecolor="none", label=label))
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("trained parameters per task (method + head, log scale)")
    ax.set_ylabel("mean top-1 accuracy over tasks (%)")
    ax.set_title("Accuracy vs. trained parameters" + ("" if suite_title == "VTAB-1k" else f" ({suite_title})"))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
