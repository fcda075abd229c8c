"""VPT's FGVC split files: `<dataset>/<split>.json`, one JSON object mapping an image path to a class id.

As `KMnP/vpt: src/data/datasets/json_dataset.py` reads them: keys are relative to the dataset's image folder
(`Task.image_root`), values are class ids, remapped to contiguous indices by sorting the distinct ids. VPT
sorts each split's own ids; the suite sorts the ids of the `train` split (which holds every class) and maps
every split with that one table, so a split that lacks a class can never shift the others' labels. When
every split holds every class, as VPT's do, the two are the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.fgvc_sources import SPLIT_COPY
from tasks.folder import DataError, SplitFile, escapes, how_to_get
from tasks.task import Task

CLASS_TABLE_SPLIT = "train"


def _load_object(path: Path, task: Task) -> tuple[dict[str, int], bytes]:
    if not path.is_file():
        raise DataError(f"{path} is missing: task {task.id} needs it; {how_to_get(task)}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {SPLIT_COPY}") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path} holds a JSON {type(data).__name__}, not one object mapping image paths to class ids; {SPLIT_COPY}"
        )
    for key, value in data.items():
        if type(value) is not int:  # bool is an int subclass; VPT's ids are plain integers
            raise DataError(
                f"{path}: class id {value!r} of {key!r} is not an integer (a JSON number such as 17); {SPLIT_COPY}"
            )
    return data, raw


def class_table(task_dir: Path, task: Task) -> dict[int, int]:
    """Class id -> contiguous label, from the sorted distinct ids of the `train` split."""
    data, _ = _load_object(Path(task_dir) / f"{CLASS_TABLE_SPLIT}.json", task)
    ids = sorted(set(data.values()))
    if len(ids) != task.num_classes:
        raise DataError(
            f"{Path(task_dir) / 'train.json'} has {len(ids)} distinct class ids, task {task.id} has "
            f"{task.num_classes} classes; {SPLIT_COPY}"
        )
    return {cid: i for i, cid in enumerate(ids)}


def read_json_split(task_dir: Path, task: Task, split: str, *, check_files: bool = True) -> SplitFile:
    """Parse and validate `<task_dir>/<split>.json`: an object, keys inside the image folder, integer ids of
    the train split's classes, (optionally) every image a file."""
    path = Path(task_dir) / f"{split}.json"
    data, raw = _load_object(path, task)
    if not data:
        raise DataError(f"{path} lists no images")
    table = data and class_table(task_dir, task)
    image_dir = Path(task_dir) / task.image_root
    images: list[Path] = []
    labels: list[int] = []
    for rel, cid in data.items():
        problem = escapes(rel)
        if problem:
            # `escapes` speaks of the folder the path is relative to: here the image folder.
            problem = problem.replace("task folder", "image folder")
            raise DataError(
                f"{path}: image path {rel!r} {problem}; list images by their path relative to the image folder "
                f"{image_dir}, inside it"
            )
        if cid not in table:
            raise DataError(f"{path}: class id {cid} of {rel!r} is not one of train.json's class ids")
        image = image_dir / rel
        if check_files and not image.is_file():
            raise DataError(
                f"{path}: image {image} does not exist; the split files name the images of {task.title}'s "
                f"official release, unpacked under {image_dir}"
            )
        images.append(image)
        labels.append(table[cid])
    return SplitFile(task, split, path, tuple(images), tuple(labels), hashlib.sha256(raw).hexdigest())
