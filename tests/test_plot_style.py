"""The plots' method styles (a colour per family, a marker per method) and label placement, and the PNG's labels."""

from __future__ import annotations

import itertools
import random

import pandas as pd

from benchmark.report.plot import LABEL_GID, figure
from benchmark.report.plot_style import CATEGORY_STYLE, MARKERS, Box, Label, category, place_labels, styles
from methods import CATEGORIES, get_method, list_methods


def test_every_registered_method_has_a_family():
    assert tuple(CATEGORY_STYLE) == CATEGORIES
    assert {m: get_method(m).category for m in list_methods() if get_method(m).category not in CATEGORIES} == {}
    # Only plugins and names the registry does not know fall back to `other`.
    assert [m for m in list_methods() if category(m) == "other"] == []
    assert category("no_such_method") == "other"
    assert {category(m) for m in ("vpt_deep", "lora", "adapter", "sct", "peft_lora", "linear")} == set(CATEGORIES[:-1])


def test_one_colour_per_family_and_distinct_looks_inside_one():
    names = [*list_methods(), *(f"plugin_{i}" for i in range(len(MARKERS) + 3))]
    style = styles(reversed(names))
    by_family: dict[str, list[tuple[str, str]]] = {}
    for s in style.values():
        by_family.setdefault(s.family, []).append((s.colour, s.marker))
    for family, looks in by_family.items():
        assert len(set(looks)) == len(looks), family
        if len(looks) <= len(MARKERS):  # past the markers, the colour is shaded
            assert {c for c, _ in looks} == {CATEGORY_STYLE[family][1]}, family
    # A method keeps its look whatever else is on the board.
    assert styles(["lora"])["lora"] == style["lora"] and styles(["lora", "arc"])["arc"] == styles(["arc"])["arc"]


def test_placed_labels_never_overlap_and_stay_inside():
    rng = random.Random(0)
    bounds = Box(0, 0, 400, 300)
    for trial in range(20):
        labels = [Label(rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(20, 80), 13, front=rng.random() < 0.2)
                  for _ in range(rng.randint(1, 60))]  # fmt: skip
        others = [(rng.uniform(0, 400), rng.uniform(0, 300)) for _ in range(10)]
        line = sorted((rng.uniform(0, 400), rng.uniform(0, 300)) for _ in range(3))
        boxes = place_labels(labels, bounds, 6, others, line)
        kept = [b for b in boxes if b is not None]
        assert all(b.inside(bounds) for b in kept)
        assert not any(a.overlaps(b) for i, a in enumerate(kept) for b in kept[i + 1 :]), trial
        # Off the front, a label covers no other point and does not cross the line (sampled along it).
        samples = [(a[0] + (b[0] - a[0]) * k / 200, a[1] + (b[1] - a[1]) * k / 200)
                   for a, b in itertools.pairwise(line) for k in range(201)]  # fmt: skip
        for label, box in zip(labels, boxes, strict=True):
            if box is None or label.front:
                continue
            assert not any(box.x0 < x < box.x1 and box.y0 < y < box.y1 for x, y in samples), trial
            assert not any(box.overlaps(Box(x - 6, y - 6, x + 6, y + 6)) for x, y in others), trial
    # An uncrowded plot labels every point, right of it.
    alone = place_labels([Label(100, 100, 40, 13), Label(300, 200, 40, 13)], bounds, radius=6)
    assert all(b is not None and b.x0 > x for b, x in zip(alone, (100, 300), strict=True))


def crowded_board() -> pd.DataFrame:
    """40 rows of ours, near one another, and a reported row for each of the first ten."""
    names = [*list_methods(), "arc", "snell"]
    rows = [
        {"method": m, "kind": "ours", "protocol": "p", "tasks": 19, "board_tasks": 19, "complete": i % 9 != 4,
         "avg_tasks_mean": 68 + 4 * ((i * 7) % 11) / 10, "tunable": 50_000 * 10 ** (((i * 5) % 13) / 12), "head": 7690}
        for i, m in enumerate(names)
    ]  # fmt: skip
    rows += [
        {**r, "kind": "reported", "source": "paper", "avg_tasks_mean": r["avg_tasks_mean"] + 1} for r in rows[:10]
    ]
    return pd.DataFrame(rows)


def test_png_labels_do_not_intersect():
    fig = figure(crowded_board())
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_gid() == LABEL_GID]
    boxes = [t.get_window_extent(renderer) for t in texts]
    area = ax.get_window_extent(renderer)
    assert len(boxes) >= 3
    assert not [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i].overlaps(boxes[j])]  # fmt: skip
    assert all(area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1 for b in boxes)
    # One colour per family among the points (ours filled, the papers' outlined).
    colours: dict[str, set[tuple[float, ...]]] = {}
    board = crowded_board()
    shown = [c for c in ax.collections if len(c.get_offsets())]
    for (_, row), points in zip(board.iterrows(), shown, strict=True):
        paint = points.get_facecolor() if row.kind == "ours" else points.get_edgecolor()
        colours.setdefault(category(row.method), set()).add(tuple(paint[0][:3].round(3)))
    assert all(len(c) == 1 for c in colours.values()) and len(colours) == len(CATEGORY_STYLE)
