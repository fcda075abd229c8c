"""The accuracy-versus-parameters plot of a leaderboard, as PNG (matplotlib); the page draws its own as SVG.

Both draw a method alike (`benchmark.report.plot_style`: colour by family, marker by method) and label by the same
rule: the Pareto front of our complete rows first, then our other rows where a label fits beside its point without
crossing another label or leaving the plot.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.path import Path as MarkerPath

from benchmark.report.format import incomplete, trained_params
from benchmark.report.plot_style import CATEGORY_STYLE, MARKERS, Box, Label, pareto_front, place_labels, styles

# What a suite's reported rows print as their mean (the plot's y for them).
HEADLINE = {"VTAB-1k": "mean of 19", "FGVC": "mean of 5"}
LABEL_GID = "label"  # the gid of the point labels' texts (tests find them by it)


def _kind(row: pd.Series) -> str:
    return row.get("kind", "ours")


def _marker(name: str) -> MarkerPath:
    """A `MARKERS` outline as a closed path (an open one would leave a hollow marker's last side undrawn)."""
    outline = MARKERS[name]
    return MarkerPath([*outline, outline[0]], closed=True)


def figure(board: pd.DataFrame, suite_title: str = "VTAB-1k") -> Figure:
    """Mean accuracy over tasks against trained parameters (log axis), one point per row, labels placed.

    Our rows are filled markers at tunable + head; reported rows (`kind` = `reported`) are hollow markers of the
    same colour and shape as our row of that method, at the printed parameter count and mean. Incomplete rows of
    ours (`complete` false: their mean covers fewer tasks) are faint. Rows without a positive parameter count cannot
    be placed on the log axis and are left out (the table still lists them).
    """
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120, layout="constrained")
    has = {"avg_tasks_mean", "tunable"} <= set(board.columns)
    shown = board.dropna(subset=["avg_tasks_mean", "tunable"]) if has else board.iloc[0:0]
    points = [(trained_params(r), float(r.avg_tasks_mean), r) for _, r in shown.iterrows()]
    points = [p for p in points if p[0] > 0]
    style = styles(r.method for _, _, r in points)
    for x, y, r in points:
        s = style[r.method]
        if _kind(r) == "reported":
            ax.scatter([x], [y], s=46, marker=_marker(s.marker), facecolors="none", edgecolors=s.colour,
                       linewidths=1.4, zorder=2)  # fmt: skip
        else:
            alpha = 0.35 if incomplete(r) else 1.0
            ax.scatter([x], [y], s=40, marker=_marker(s.marker), color=s.colour, alpha=alpha, zorder=3)
    ours = [i for i, (_, _, r) in enumerate(points) if _kind(r) == "ours" and not incomplete(r)]
    front = {ours[i] for i in pareto_front([points[i][:2] for i in ours])}
    if front:
        line = sorted((points[i][0], points[i][1]) for i in front)
        ax.plot(*zip(*line, strict=True), color="0.3", linestyle="--", linewidth=1, zorder=1)
    dot = {"marker": "o", "linestyle": "", "color": "0.3"}
    handles = [plt.Line2D([], [], **dot, label="ours: mean over the board's tasks")]
    if any(_kind(r) == "ours" and incomplete(r) for _, _, r in points):
        label = "ours, incomplete:\nmean over fewer tasks (not comparable)"
        handles.append(plt.Line2D([], [], **dot, alpha=0.35, label=label))
    if any(_kind(r) == "reported" for _, _, r in points):
        label = f"reported (ViT-B/16, real {suite_title}):\n{HEADLINE.get(suite_title, 'mean')}, params as printed"
        handles.append(plt.Line2D([], [], **dot, markerfacecolor="none", label=label))
    if front:
        handles.append(plt.Line2D([], [], color="0.3", linestyle="--", label="Pareto front of our complete rows"))
    for family in sorted({s.family for s in style.values()}, key=list(CATEGORY_STYLE).index):
        title, colour = CATEGORY_STYLE[family]
        handles.append(plt.Line2D([], [], marker="s", linestyle="", color=colour, label=title))
    fig.legend(handles=handles, fontsize=7, loc="outside right upper")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("trained parameters per task (method + head, log scale)")
    ax.set_ylabel("mean top-1 accuracy over tasks (%)")
    ax.set_title("Accuracy vs. trained parameters" + ("" if suite_title == "VTAB-1k" else f" ({suite_title})"))
    ax.grid(True, which="both", alpha=0.3)
    _label(fig, ax, points, front)
    return fig


def _label(fig: Figure, ax: plt.Axes, points: list[tuple[float, float, pd.Series]], front: set[int]) -> None:
    """Our rows' labels (`method (n tasks)`: the PNG has no tooltips), placed by `place_labels` in figure pixels."""
    fig.canvas.draw()  # the layout, final from here on: the labels sit inside the axes and must not move it
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    height = fig.bbox.height
    texts, labels, order = [], [], []
    for i, (x, y, r) in enumerate(points):
        if _kind(r) != "ours":
            continue
        count = f"{r.tasks}/{r.board_tasks} tasks: incomplete" if incomplete(r) else f"{r.tasks} tasks"
        text = f"{r.method} ({count})"
        # Labels are plain text: a `$` in a method name is no mathtext formula (an unpaired one would not draw).
        t = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset pixels", fontsize=7.5, ha="left",
                        va="bottom", color="0.45" if incomplete(r) else "black", usetex=False, parse_math=False,
                        gid=LABEL_GID, zorder=4)  # fmt: skip
        extent = t.get_window_extent(renderer)
        px, py = ax.transData.transform((x, y))
        texts.append(t)
        labels.append(Label(px, height - py, extent.width + 2, extent.height + 2, front=i in front))
        order.append((incomplete(r), -y))  # the front first (place_labels), then by accuracy
    area = ax.get_window_extent(renderer)
    bounds = Box(area.x0, height - area.y1, area.x1, height - area.y0)
    ranked = sorted(range(len(labels)), key=order.__getitem__)
    marks = [(a, height - b) for a, b in ax.transData.transform([(x, y) for x, y, _ in points]).reshape(-1, 2)]
    line = [(a, height - b) for a, b in ax.transData.transform(sorted(points[i][:2] for i in front)).reshape(-1, 2)]
    boxes = place_labels([labels[i] for i in ranked], bounds, 6, marks, line)
    for i, box in zip(ranked, boxes, strict=True):
        if box is None:
            texts[i].remove()
        else:  # the text's lower left corner, 1 px inside its box
            texts[i].set_position((box.x0 + 1 - labels[i].x, (labels[i].y - box.y1) + 1))


def plot(board: pd.DataFrame, suite_title: str = "VTAB-1k") -> bytes:
    """`figure` as PNG bytes (no timestamp in the file, so that an unchanged board gives identical bytes)."""
    fig = figure(board, suite_title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
