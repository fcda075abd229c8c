"""Synthetic FGVC datasets in VPT's real layout, for tests and CI.

Each dataset keeps its true class count and its real folder structure: split files `train.json`,
`val.json` and `test.json` (one object: image path relative to the image folder -> class id), images in
per-class folders under the dataset's image root (Stanford Cars' flat `car_ims/NNNNNN.jpg`, Flowers'
`jpg/image_NNNNN.jpg`), class ids as the real files carry them (1-based; NABirds' sparse ids, so the
remapping to contiguous labels is exercised). Images are non-square JPEGs of varied sizes, each class a
colour and stripe texture (`tasks.synth.render`) stretched to its own aspect ratio.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.synth import SYNTH_VERSION, SynthConfig, class_recipes, render, task_seed
from tasks.task import Task

SPLIT_OF = {"train": "train800", "val": "val200", "test": "test"}  # which of SynthConfig's counts each uses
# How far a side may stretch past the configured size: images are between S×S and 1.6S × 1.6S, any aspect.
MAX_STRETCH = 1.6


def class_ids(task: Task) -> list[int]:
    """The class ids the synthetic split files carry: NABirds' are sparse, the others 1-based."""
    step = 2 if task.id == "nabirds" else 1
    first = 295 if task.id == "nabirds" else 1
    return [first + step * i for i in range(task.num_classes)]


def image_path(task: Task, label: int, index: int) -> str:
    """An image's key in the split files, shaped like the real dataset's."""
    if task.id == "stanfordcars":
        return f"car_ims/{index + 1:06d}.jpg"
    if task.id == "oxfordflowers":
        return f"jpg/image_{index + 1:05d}.jpg"
    return f"{label:04d}.class/{index + 1:06d}.jpg"


def write_fgvc_task(out: Path, task: Task, config: SynthConfig) -> Path:
    """Write one synthetic FGVC dataset under `out/<task.folder>`; skipped when an identical one is there.

    Built under a temporary name and renamed into place, so an interrupted run never leaves a folder that
    looks complete.
    """
    out = Path(out)
    dest = out / task.folder
    stamp = {"version": SYNTH_VERSION, "task": task.id, **asdict(config)}
    marker = dest / "synth.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dest
    tmp = out / f".tmp-{task.folder}"
    shutil.rmtree(tmp, ignore_errors=True)
    image_dir = tmp / task.image_root
    recipes = class_recipes(task, config.seed)
    ids = class_ids(task)
    rng = np.random.default_rng(task_seed(task, config.seed) + 1)
    counts = config.split_counts()
    index = 0
    for split, count_of in SPLIT_OF.items():
        labels = np.repeat(np.arange(task.num_classes), counts[count_of])
        rng.shuffle(labels)
        entries: dict[str, int] = {}
        for label in labels:
            rel = image_path(task, ids[label], index)
            index += 1
            height, width = (rng.uniform(1.0, MAX_STRETCH, size=2) * config.image_size).astype(int)
            square = render(recipes[label], max(height, width), rng, config.noise)
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(square).resize((int(width), int(height))).save(image_dir / rel, quality=90)
            entries[rel] = ids[label]
        (tmp / f"{split}.json").write_text(json.dumps(entries) + "\n")
    (tmp / "synth.json").write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
