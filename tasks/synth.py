"""Synthetic VTAB-1k look-alikes in the community on-disk layout, for tests and the demo.

Each task keeps its real class count. A class is a fixed recipe drawn from a per-task random
generator: a base colour, a stripe orientation and a stripe frequency. Each image draws a random
stripe phase, brightness jitter, pixel noise and a distractor square, so the label is learnable from
the pixels while no two images are identical. Images are written as JPEG files at
`<out>/<folder>/images/<split>/<NNNNNN>.jpg` with split files `<split>.txt` (`path label` lines),
exactly like the real archive, `train800val200` being written again as the union of the other two.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.vtab import Task

SYNTH_VERSION = 1


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


def _task_seed(task: Task, seed: int) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(task.id))) % 2**32


def class_recipes(task: Task, seed: int) -> np.ndarray:
    """Per-class (r, g, b, angle, frequency) rows, [C, 5], deterministic in (task, seed)."""
    rng = np.random.default_rng(_task_seed(task, seed))
    c = task.num_classes
    colours = rng.uniform(0.15, 0.85, size=(c, 3))
    angles = rng.uniform(0.0, math.pi, size=(c, 1))
    freqs = rng.uniform(1.0, 4.0, size=(c, 1))
    return np.concatenate([colours, angles, freqs], axis=1)


def render(recipe: np.ndarray, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One image of the class described by `recipe`, uint8 [S, S, 3]."""
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
    img = img + rng.normal(0.0, noise, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


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
    rng = np.random.default_rng(_task_seed(task, config.seed) + 1)
    lines: dict[str, list[str]] = {}
    for split, per_class in config.split_counts().items():
        (tmp / "images" / split).mkdir(parents=True)
        labels = np.repeat(np.arange(task.num_classes), per_class)
        rng.shuffle(labels)
        lines[split] = []
        for i, label in enumerate(labels):
            rel = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(render(recipes[label], config.image_size, rng, config.noise)).save(tmp / rel, quality=90)
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
