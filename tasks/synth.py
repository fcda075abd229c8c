"""A procedural mini-VTAB in the community on-disk layout, for tests and the demo.

Each task keeps its real class count and its group's kind of label:

- natural: a class is a colour and a stripe texture (orientation, frequency) drawn per task;
- specialized: a class is a texture type and scale (stripes, checks, dots, rings) in random colours,
  so colour says nothing and the pattern everything;
- structured: the label is geometry, as in VTAB's structured tasks: the number of objects
  (clevr_count), the size of the largest object (clevr_dist, kitti; with its colour for dmlab), a
  shape's horizontal or vertical position (dsprites_loc, smallnorb_ele) or orientation (dsprites_ori,
  smallnorb_azi).

Every image adds random nuisance (positions, colours, noise), so the label is learnable but no two
images are identical. Images are JPEG files at `<out>/<folder>/images/<split>/<NNNNNN>.jpg` with split
files `<split>.txt` (`path label` lines), exactly like the real archive, `train800val200` being written
again as the union of the other two.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.task import Task

SYNTH_VERSION = 2


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one synthetic task.

    Attributes:
        per_class: training images per class (train800); test gets as many, val200 a quarter (at least 1).
        image_size: side of the square images in pixels.
        seed: base seed; the task's class recipes and images follow from it and the task id.
        noise: standard deviation of the pixel noise, in [0, 1] intensity units.
    """

    per_class: int = 8
    image_size: int = 32
    seed: int = 0
    noise: float = 0.08

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {self.per_class}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")

    def split_counts(self) -> dict[str, int]:
        """Images per class in each independently drawn split."""
        return {"train800": self.per_class, "val200": max(1, self.per_class // 4), "test": self.per_class}


def task_seed(task: Task, seed: int) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(task.id))) % 2**32


def class_recipes(task: Task, seed: int) -> np.ndarray:
    """Per-class (r, g, b, angle, frequency) rows, [C, 5], deterministic in (task, seed)."""
    rng = np.random.default_rng(task_seed(task, seed))
    c = task.num_classes
    colours = rng.uniform(0.15, 0.85, size=(c, 3))
    angles = rng.uniform(0.0, math.pi, size=(c, 1))
    freqs = rng.uniform(1.0, 4.0, size=(c, 1))
    return np.concatenate([colours, angles, freqs], axis=1)


def render(recipe: np.ndarray, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A natural-group image of the class described by `recipe`, uint8 [S, S, 3]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = recipe[3], recipe[4]
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    img = recipe[None, None, :3] * (0.75 + 0.5 * stripes[..., None])
    img = img * rng.uniform(0.85, 1.15)
    # A distractor square of random colour at a random place: appearance that carries no label.
    side = max(2, size // 6)
    y0, x0 = rng.integers(0, size - side, size=2)
    img[y0 : y0 + side, x0 : x0 + side] = rng.uniform(0, 1, size=3)
    return finish_image(img, rng, noise)


def finish_image(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    img = img + rng.normal(0.0, noise, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return yy / size, xx / size


def texture(label: int, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A specialized-group image: texture type label % 4 at scale label // 4, in two random colours."""
    yy, xx = unit_grid(size)
    kind, scale = label % 4, label // 4
    freq = 2.0 + 1.5 * scale
    dy, dx = rng.uniform(0, 1, size=2)
    if kind == 0:  # stripes at a random orientation
        a = rng.uniform(0, math.pi)
        field = np.sin(2 * math.pi * freq * ((xx + dx) * math.cos(a) + (yy + dy) * math.sin(a))) > 0
    elif kind == 1:  # checks
        field = (np.floor((xx + dx) * freq) + np.floor((yy + dy) * freq)) % 2 == 0
    elif kind == 2:  # dots
        fx, fy = ((xx + dx) * freq) % 1 - 0.5, ((yy + dy) * freq) % 1 - 0.5
        field = fx**2 + fy**2 < 0.09
    else:  # rings around a random centre
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        field = np.sin(2 * math.pi * freq * np.hypot(xx - cx, yy - cy)) > 0
    fg, bg = rng.uniform(0, 1, size=(2, 3))
    img = np.where(field[..., None], fg, bg)
    return finish_image(img, rng, noise)


def paint_shape(
    img: np.ndarray, cy: float, cx: float, radius: float, colour: np.ndarray, kind: str, angle: float = 0.0
):
    """Paint a disc, square or oriented bar (with a head marking its direction) into `img` in place."""
    yy, xx = unit_grid(img.shape[0])
    if kind == "disc":
        mask = np.hypot(xx - cx, yy - cy) <= radius
    elif kind == "square":
        mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    else:  # a bar of length 2·radius along `angle`, with a head at its leading end
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        mask = (np.abs(u) <= radius) & (np.abs(v) <= radius * 0.22)
        head = np.hypot(xx - cx - radius * math.cos(angle), yy - cy - radius * math.sin(angle)) <= radius * 0.35
        mask |= head
    img[mask] = colour


def _scene(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dim background with a faint gradient: the canvas of the structured tasks."""
    yy, xx = unit_grid(size)
    base = rng.uniform(0.05, 0.3, size=3)
    return base + 0.1 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]


def _bright(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.55, 1.0, size=3)


def geometry(task: Task, label: int, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A structured-group image whose label is the task's geometric quantity."""
    img = _scene(size, rng)
    c = task.num_classes
    rule = STRUCTURED_RULES.get(task.id, "count")
    if rule == "count":  # label + 3 objects (clevr_count: 3-10)
        n = label + 3
        cells = rng.permutation(16)[:n]  # one object per cell of a 4×4 grid, jittered: countable
        for cell in cells:
            cy = (cell // 4 + 0.5 + rng.uniform(-0.15, 0.15)) / 4
            cx = (cell % 4 + 0.5 + rng.uniform(-0.15, 0.15)) / 4
            paint_shape(img, cy, cx, rng.uniform(0.05, 0.08), _bright(rng), str(rng.choice(["disc", "square"])))
    elif rule in ("size", "size_colour"):  # the largest of a few objects; its size bin is the label
        bins = c // 2 if rule == "size_colour" else c
        level = label % bins
        big = 0.08 + 0.17 * (level + rng.uniform(0.1, 0.9)) / bins
        for _ in range(rng.integers(0, 3)):
            paint_shape(img, *rng.uniform(0.15, 0.85, size=2), rng.uniform(0.03, 0.07), _bright(rng), "disc")
        colour = _bright(rng)
        if rule == "size_colour":  # dmlab: the reward colour (reddish or bluish) doubles the classes
            colour = np.array([0.95, 0.25, 0.2]) if label // bins == 0 else np.array([0.2, 0.35, 0.95])
        paint_shape(img, *rng.uniform(0.3, 0.7, size=2), big, colour, str(rng.choice(["disc", "square"])))
    elif rule in ("x", "y"):  # position bin along one axis, the other axis random
        pos = (label + rng.uniform(0.15, 0.85)) / c
        other = rng.uniform(0.2, 0.8)
        cy, cx = (other, pos) if rule == "x" else (pos, other)
        paint_shape(img, cy, cx, 0.09, _bright(rng), str(rng.choice(["disc", "square"])))
    else:  # orientation bin over 180° (ori) or 360° (azi)
        full = 2 * math.pi if rule == "azimuth" else math.pi
        angle = (label + rng.uniform(0.2, 0.8)) / c * full
        paint_shape(img, *rng.uniform(0.4, 0.6, size=2), 0.32, _bright(rng), "bar", angle)
    return finish_image(img, rng, noise)


STRUCTURED_RULES = {
    "clevr_count": "count", "clevr_dist": "size", "kitti": "size", "dmlab": "size_colour",
    "dsprites_loc": "x", "smallnorb_ele": "y", "dsprites_ori": "orientation", "smallnorb_azi": "azimuth",
}  # fmt: skip


def synthesize(task: Task, label: int, size: int, rng: np.random.Generator, noise: float, recipes: np.ndarray):
    """One image of class `label` of `task`, by its group's generator."""
    if task.group == "natural":
        return render(recipes[label], size, rng, noise)
    if task.group == "specialized":
        return texture(label, size, rng, noise)
    return geometry(task, label, size, rng, noise)


def write_task(out: Path, task: Task, config: SynthConfig) -> Path:
    """Write one synthetic task under `out/<task.folder>`; skipped when an identical one is already there.

    The folder is built under a temporary name and renamed into place, so an interrupted run never
    leaves a folder that looks complete.
    """
    out = Path(out)
    dest = out / task.folder
    stamp = {"version": SYNTH_VERSION, "task": task.id, **asdict(config)}
    marker = dest / "synth.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dest
    tmp = out / f".tmp-{task.folder}"
    shutil.rmtree(tmp, ignore_errors=True)
    recipes = class_recipes(task, config.seed)
    rng = np.random.default_rng(task_seed(task, config.seed) + 1)
    lines: dict[str, list[str]] = {}
    for split, per_class in config.split_counts().items():
        (tmp / "images" / split).mkdir(parents=True)
        labels = np.repeat(np.arange(task.num_classes), per_class)
        rng.shuffle(labels)
        lines[split] = []
        for i, label in enumerate(labels):
            rel = f"images/{split}/{i:06d}.jpg"
            image = synthesize(task, int(label), config.image_size, rng, config.noise, recipes)
            Image.fromarray(image).save(tmp / rel, quality=90)
            lines[split].append(f"{rel} {label}")
    # As in the real archive, train800val200's images are written again under their own split folder.
    (tmp / "images" / "train800val200").mkdir()
    union = []
    for i, line in enumerate(lines["train800"] + lines["val200"]):
        src, label = line.split()
        rel = f"images/train800val200/{i:06d}.jpg"
        shutil.copyfile(tmp / src, tmp / rel)
        union.append(f"{rel} {label}")
    lines["train800val200"] = union
    for split, split_lines in lines.items():
        (tmp / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    (tmp / "synth.json").write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
