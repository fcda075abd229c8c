"""The page's accuracy-versus-parameters plot as inline SVG (`benchmark.report.html` places it in the page).

Drawn here rather than by a plotting library's browser bundle: plotly's offline bundle alone is several MB of
JavaScript in every page, and a server-side SVG also shows without JavaScript.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd

from benchmark.report.format import SUITE_TASKS, format_count, format_mean_std, incomplete, printed, trained_params
from benchmark.report.plot_style import (
    CATEGORY_STYLE,
    MARKERS,
    Box,
    Label,
    pareto_front,
    place_labels,
    styles,
    text_width,
)
from tasks import SUITES

# The labels' font size (page.css's `.plot .label`) and the markers' radius, in the SVG's pixels.
LABEL_PX, RADIUS = 11, 6


def _marker_path(marker: str) -> str:
    """A marker's outline as path data, centred on the origin, of radius `RADIUS` (y down, as SVG's)."""
    return "M" + " L".join(f"{x * RADIUS:.2f},{-y * RADIUS:.2f}" for x, y in MARKERS[marker]) + " Z"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _ticks(lo: float, hi: float) -> list[float]:
    """Round accuracy ticks covering [lo, hi]: 4 to 8 of them."""
    span = max(hi - lo, 1.0)
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 25, 50) if span / s <= 7)
    return list(np.arange(math.floor(lo / step) * step, hi + step, step))


def _params_label(n: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:g}{suffix}"
    return f"{n:g}"


def plot_svg(board: pd.DataFrame, suite: str = "vtab1k") -> str:
    """Accuracy (mean over tasks) against trained parameters (method + head, log x) as inline SVG.

    One point per row that has both: ours filled, reported hollow (`class="pt reported"`), each with its
    tooltip text in `data-tip` (and a `<title>` for browsers without JavaScript); the Pareto front of our
    complete rows (no smaller complete row is as accurate) as a line. Our incomplete rows (`class="pt ours
    incomplete"`: their mean covers fewer tasks) are faint, outlined with dashes, and never on the front.
    """
    has = {"avg_tasks_mean", "tunable"} <= set(board.columns)
    shown = board.dropna(subset=["avg_tasks_mean", "tunable"]) if has else board.iloc[0:0]
    # VTAB-1k's plot keeps the ids it always had; another suite's plot, on the same page, gets its own.
    suffix = "" if suite == "vtab1k" else f"-{suite}"
    n_tasks, headline = len(SUITE_TASKS[suite]), "mean of 19" if suite == "vtab1k" else "mean"
    points = [(f"r{i}{suffix}", trained_params(r), float(r.avg_tasks_mean), r) for i, r in shown.iterrows()]
    points = [p for p in points if p[1] > 0]
    if not points:
        return '<p class="empty">No row has both an accuracy and a parameter count to plot.</p>'
    ours = [p for p in points if p[3].get("kind", "ours") == "ours" and not incomplete(p[3])]
    front = [ours[i] for i in pareto_front([(p[1], p[2]) for p in ours])]
    legend = [("ours: mean over the board's tasks", '<circle cx="8" cy="0" r="5" fill="#555"/>')]
    if any(p[3].get("kind", "ours") == "ours" and incomplete(p[3]) for p in points):
        faint = '<circle class="incomplete" cx="8" cy="0" r="5" fill="#555" fill-opacity="0.35" stroke="#555"/>'
        legend.append(("ours, incomplete: mean over fewer tasks (not comparable)", faint))
    if any(p[3].get("kind", "ours") == "reported" for p in points):
        legend.append((f"reported (ViT-B/16, real {SUITES[suite].title}): {headline}, params as printed",
                       '<circle cx="8" cy="0" r="5" fill="none" stroke="#555"/>'))  # fmt: skip
    if front:
        legend.append(("Pareto front of our complete rows", '<line class="front" x1="0" x2="16" y1="0" y2="0"/>'))
    for family in sorted({s.family for s in styles(shown.method).values()}, key=list(CATEGORY_STYLE).index):
        title, colour = CATEGORY_STYLE[family]
        legend.append((title, f'<rect class="swatch" x="3" y="-5" width="10" height="10" fill="{colour}"/>'))
    width, left, right, bottom = 860, 64, 24, 52
    # The legend above the plotting area, in as many rows of 16 px as its entries need.
    places, x, y = [], left, 16
    for text, _ in legend:
        if x > left and x + 22 + 6 * len(text) > width - right:
            x, y = left, y + 16
        places.append((x, y))
        x += 40 + 6 * len(text)
    top = y + 24
    height = 420 + top
    xs, ys = [math.log10(p[1]) for p in points], [p[2] for p in points]
    x0, x1 = math.floor(min(xs) - 0.2), math.ceil(max(xs) + 0.2)
    yt = _ticks(min(ys) - 1, max(ys) + 1)
    y0, y1 = yt[0], yt[-1]

    def px(x: float) -> float:
        return left + (math.log10(x) - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [
        f'<svg id="plot{suffix}" class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="accuracy versus trained parameters">'
    ]
    for k in range(x0, x1 + 1):
        for m in range(1, 10) if k < x1 else (1,):
            x = px(m * 10.0**k)
            out.append(f'<line class="{"grid" if m == 1 else "minor"}" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                       f'y2="{height - bottom}"/>')  # fmt: skip
        out.append(f'<text class="tick" x="{px(10.0**k):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                   f"{_params_label(10.0**k)}</text>")  # fmt: skip
    for y in yt:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text class="axis" x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
               "trained parameters per task (method + head, log scale)</text>")  # fmt: skip
    out.append(f'<text class="axis" transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" '
               'text-anchor="middle">mean top-1 accuracy over tasks (%)</text>')  # fmt: skip
    if front:
        line = " ".join(f"{px(p[1]):.1f},{py(p[2]):.1f}" for p in front)
        out.append(
            f'<polyline id="pareto{suffix}" points="{line}"><title>Pareto front of our complete rows</title></polyline>'
        )
    style, on_front_keys = styles(board.method), {p[0] for p in front}
    labels: list[tuple[str, str, Label, tuple[bool, float]]] = []
    for key, x, y, r in points:
        kind, s = r.get("kind", "ours"), style[r.method]
        if kind == "ours":
            seeds = f"{int(r.seeds)} seed{'s' * (int(r.seeds) != 1)}, {r.tasks}/{n_tasks} tasks"
            acc = f"accuracy {format_mean_std(y, r.get('avg_tasks_std'))} (mean over tasks)"
            if incomplete(r):
                acc += f"\nincomplete: {r.tasks} of the board's {r.board_tasks} tasks, not on the front"
        else:
            seeds = f"reported by {r.source}, {r.tasks}/{n_tasks} tasks"
            acc = f"accuracy {printed(y)} ({headline}, as printed)"
        head = _num(r.get("head"))
        params = f"params {format_count(r.tunable)}" + (f" + head {format_count(head)}" if head else "")
        tip = "\n".join([r.method, r.protocol, seeds, acc, params, f"family: {CATEGORY_STYLE[s.family][0]}"])
        paint = f'fill="{s.colour}"' if kind == "ours" else f'fill="none" stroke="{s.colour}"'
        if kind == "ours" and incomplete(r):
            kind, paint = "ours incomplete", f'{paint} fill-opacity="0.35" stroke="{s.colour}"'
        out.append(f'<path class="pt {kind}" data-key="{key}" data-family="{s.family}" data-marker="{s.marker}" '
                   f'transform="translate({px(x):.1f} {py(y):.1f})" d="{_marker_path(s.marker)}" {paint} '
                   f'data-tip="{_esc(tip)}"><title>{_esc(tip)}</title></path>')  # fmt: skip
        if kind.startswith("ours"):
            size = (text_width(r.method, LABEL_PX), LABEL_PX * 1.3)
            on_front = key in on_front_keys
            labels.append((key, r.method, Label(px(x), py(y), *size, front=on_front), (incomplete(r), -y)))
    # Our other complete rows' labels by accuracy, then the incomplete ones' (the front's go first anyway).
    labels.sort(key=lambda k: k[3])
    area = Box(left, top, width - right, height - bottom)
    marks = [(px(x), py(y)) for _, x, y, _ in points]
    line = [(px(p[1]), py(p[2])) for p in front]
    boxes = place_labels([k[2] for k in labels], area, RADIUS + 1, marks, line)
    for (key, text, *_), box in zip(labels, boxes, strict=True):
        if box is not None:  # the baseline sits one em below the box's top, so the descenders stay inside it
            out.append(f'<text class="label" data-key="{key}" x="{box.x0:.1f}" y="{box.y0 + LABEL_PX * 1.02:.1f}">'
                       f"{_esc(text)}</text>")  # fmt: skip
    for (x, y), (text, mark) in zip(places, legend, strict=True):
        out.append(
            f'<g class="legend" transform="translate({x} {y})">{mark}<text x="22" y="4">{_esc(text)}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
