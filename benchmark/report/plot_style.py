"""How the accuracy-versus-parameters plots draw a method, and where their labels go.

Shared by the page's SVG (`benchmark.report.svg`) and the PNG (`benchmark.report.plot`), so that a method looks the
same in both: one colour per method family (`MethodConfig.category`, read through the registry; a name the
registry does not know, such as a result of a renamed method or a reference row of a method we lack, is `other`)
and, inside a family, one marker per method. Labels are placed greedily (`place_labels`): the Pareto front's
first, then the others where they fit; a label that would cross another label or leave the plot is moved to
another side of its point, or dropped (its point keeps its tooltip).
"""

from __future__ import annotations

import colorsys
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from matplotlib.colors import to_hex, to_rgb

from methods import CATEGORIES, UnknownMethodError, get_method, list_methods

# Family -> (legend title, colour): the Okabe-Ito colour-blind-safe palette, neutral greys for baselines and `other`.
CATEGORY_STYLE: dict[str, tuple[str, str]] = {
    "prompt": ("prompts", "#0072b2"),
    "adapter": ("adapters", "#e69f00"),
    "reparam": ("re-parameterisable", "#009e73"),
    "selection": ("selection / search", "#cc79a7"),
    "peft": ("HF peft tuners", "#d55e00"),
    "baseline": ("baselines", "#3a3a3a"),
    "other": ("other", "#9a9a9a"),
}
assert tuple(CATEGORY_STYLE) == CATEGORIES, "a family without a colour"


def _polygon(n: int, phase: float = 90.0, inner: float | None = None) -> tuple[tuple[float, float], ...]:
    """A regular n-gon (a star of n points when `inner` is its inner radius), radius 1, y up, phase in degrees."""
    points = []
    for k in range(n * (2 if inner else 1)):
        radius = inner if inner and k % 2 else 1.0
        angle = math.radians(phase + k * 360 / (n * (2 if inner else 1)))
        points.append((round(radius * math.cos(angle), 4), round(radius * math.sin(angle), 4)))
    return tuple(points)


def _cross(w: float, turn: float) -> tuple[tuple[float, float], ...]:
    """A plus of arm half-width `w` (a cross when turned by 45 degrees)."""
    arm = ((w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w), (1, w))
    c, s = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    return tuple((round(x * c - y * s, 4), round(x * s + y * c, 4)) for x, y in arm)


# Marker outlines, radius about 1, y up: drawn as the same polygons by both renderers (matplotlib takes vertices
# as a marker), so a method's marker is the same shape on the page and in the PNG.
MARKERS: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _polygon(24),
    "square": _polygon(4, 45),
    "triangle": _polygon(3, 90),
    "diamond": ((0, 1.15), (0.8, 0), (0, -1.15), (-0.8, 0)),
    "triangle_down": _polygon(3, -90),
    "pentagon": _polygon(5),
    "star": _polygon(5, 90, inner=0.45),
    "plus": _cross(0.34, 0),
    "hexagon": _polygon(6, 0),
    "cross": _cross(0.3, 45),
    "triangle_left": _polygon(3, 180),
    "triangle_right": _polygon(3, 0),
}


@dataclass(frozen=True)
class Style:
    """How one method is drawn: its family (a `CATEGORIES` value), colour and marker (a `MARKERS` key)."""

    family: str
    colour: str
    marker: str


def category(method: str) -> str:
    """A method's family; `other` for a name the registry does not know."""
    try:
        value = get_method(method).category
    except UnknownMethodError:
        return "other"
    return value if value in CATEGORY_STYLE else "other"


def _registered_members() -> dict[str, tuple[str, ...]]:
    members: dict[str, list[str]] = {f: [] for f in CATEGORY_STYLE}
    for name in list_methods():
        members[category(name)].append(name)
    return {f: tuple(names) for f, names in members.items()}


def _shade(colour: str, round_: int) -> str:
    """The family's colour for a family with more methods than markers: darker, then lighter, each round."""
    if round_ == 0:
        return colour
    h, lightness, s = colorsys.rgb_to_hls(*to_rgb(colour))
    step = 0.18 * ((round_ + 1) // 2) * (-1 if round_ % 2 else 1)
    return to_hex(colorsys.hls_to_rgb(h, min(0.9, max(0.1, lightness + step)), s))


def styles(methods: Iterable[str]) -> dict[str, Style]:
    """Each method's style. A method's marker is its place among its family's registered methods (so it keeps
    its marker on every board); unregistered names follow, sorted. Distinct methods of one family get distinct
    (colour, marker) pairs: past the twelfth marker the family's colour is shaded."""
    names = sorted(set(methods))
    out = {}
    for name in names:
        family = category(name)
        registered = _registered_members()[family]
        members = [*registered, *(n for n in names if n not in registered and category(n) == family)]
        i = members.index(name)
        out[name] = Style(
            family, _shade(CATEGORY_STYLE[family][1], i // len(MARKERS)), list(MARKERS)[i % len(MARKERS)]
        )
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (parameters, accuracy) points no smaller point is as accurate as, by size; none when only one
    is (a front of one point is no line). The plots pass our complete rows only."""
    front, best = [], -math.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front if len(front) > 1 else []


# -- labels ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels, y down."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, other: Box) -> bool:
        return other.x0 <= self.x0 and self.x1 <= other.x1 and other.y0 <= self.y0 and self.y1 <= other.y1


@dataclass(frozen=True)
class Label:
    """A label to place: its point (pixels, y down), its text's size, and whether it is wanted before the others
    (on the Pareto front: it may then cover another point, never another label)."""

    x: float
    y: float
    width: float
    height: float
    front: bool = False


def _candidates(label: Label, radius: float, pad: float = 2.0) -> list[Box]:
    """Boxes beside the point, in order of preference: right, upper right, lower right, left, ..., above, below."""
    x, y, w, h, r = label.x, label.y, label.width, label.height, radius + pad
    corners = [(x + r, y - h / 2), (x + r * 0.7, y - r * 0.7 - h), (x + r * 0.7, y + r * 0.7), (x - r - w, y - h / 2),
               (x - r * 0.7 - w, y - r * 0.7 - h), (x - r * 0.7 - w, y + r * 0.7), (x - w / 2, y - r - h),
               (x - w / 2, y + r)]  # fmt: skip
    return [Box(a, b, a + w, b + h) for a, b in corners]


def _crosses(box: Box, line: tuple[float, float, float, float]) -> bool:
    """Whether the segment (x0, y0, x1, y1) passes through the box (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = line
    low, high = 0.0, 1.0
    for p, q in ((x0 - x1, x0 - box.x0), (x1 - x0, box.x1 - x0), (y0 - y1, y0 - box.y0), (y1 - y0, box.y1 - y0)):
        if p == 0:
            if q < 0:
                return False
        elif p < 0:
            low = max(low, q / p)
        else:
            high = min(high, q / p)
    return low <= high


def place_labels(
    labels: Sequence[Label],
    bounds: Box,
    radius: float,
    points: Sequence[tuple[float, float]] = (),
    line: Sequence[tuple[float, float]] = (),
) -> list[Box | None]:
    """Where each label goes (its box), or None where no candidate fits: front labels first, then the others in
    the given order. No two returned boxes overlap, and every one lies inside `bounds`. A label keeps clear of the
    other points (`points` and the labels' own: a square of `radius` around each) and of the polyline `line` (the
    front) where a candidate allows; off the front it must, else it is dropped."""
    segments = [(*a, *b) for a, b in itertools.pairwise(line)]
    marks = [Box(x - radius, y - radius, x + radius, y + radius) for x, y in [*points, *((p.x, p.y) for p in labels)]]
    placed: list[Box] = []
    out: list[Box | None] = [None] * len(labels)
    for i in sorted(range(len(labels)), key=lambda i: not labels[i].front):
        label = labels[i]
        others = [m for m in marks if abs(m.x0 + radius - label.x) > 0.5 or abs(m.y0 + radius - label.y) > 0.5]
        fits = [b for b in _candidates(label, radius) if b.inside(bounds) and not any(b.overlaps(o) for o in placed)]
        clear = [
            b for b in fits if not any(b.overlaps(m) for m in others) and not any(_crosses(b, s) for s in segments)
        ]
        choice = (clear or fits)[0] if clear or (fits and label.front) else None
        if choice is not None:
            placed.append(choice)
            out[i] = choice
    return out


# Approximate advance widths (in em) of a sans-serif font, generous (DejaVu Sans, the widest of the usual ones,
# rounded up), so that the SVG's label boxes, computed without a browser, contain the text as it renders.
_NARROW, _MEDIUM, _WIDE = set("ijl.,:;'|!"), set("ftr()[]/- "), set("mwMW%@")


def text_width(text: str, size: float) -> float:
    """An upper estimate of `text`'s width at font size `size` (pixels)."""
    em = sum(0.3 if c in _NARROW else 0.43 if c in _MEDIUM else 1.0 if c in _WIDE else 0.8 if c.isupper()
             else 0.85 if c in "=+<>~" else 0.65 for c in text)  # fmt: skip
    return em * size
