"""The community VTAB-1k folder layout: `<root>/<task folder>/<split>.txt`, lines `relative/path.jpg label`.

Every problem is raised as a `DataError` whose message names the file (and line) and says what to do,
so callers can report it in one line before any training starts.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from tasks.images import to_rgb
from tasks.task import Task

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
HOW_TO_GET_DATA = (
    "get VTAB-1k with `python -m benchmark data` (or `python -m benchmark synth --out DIR` for synthetic data)"
)


def how_to_get(task: Task) -> str:
    """The advice that ends every message about `task`'s missing or broken data."""
    if task.suite == "vtab1k":
        return HOW_TO_GET_DATA
    return (
        f"get {task.suite_info.title} with `python -m benchmark data --suite {task.suite} --from DIR|ARCHIVE` "
        f"(or `python -m benchmark synth --suite {task.suite} --out DIR` for synthetic data)"
    )


# Pillow warns about an image over `Image.MAX_IMAGE_PIXELS` (DecompressionBombWarning, two lines on stderr per
# image) and refuses one over twice that. `decode_image` refuses both itself, in one line, so the warning says
# nothing more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(ValueError):
    """A problem with the data on disk: missing folder, malformed split file, bad label, unreadable image."""


@dataclass(frozen=True)
class SplitFile:
    """One parsed split file: image paths (absolute) and labels, with the file's sha256 for provenance."""

    task: Task
    split: str
    path: Path
    images: tuple[Path, ...]
    labels: tuple[int, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)


def find_task_dir(root: Path, task: Task) -> Path:
    """The folder of `task` under `root`, found under its canonical id or any alias (case-insensitive)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {what}; {how_to_get(task)}")
    wanted = {n.lower() for n in task.names}
    matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in wanted)
    if not matches:
        tried = ", ".join(task.names)
        raise DataError(f"no folder for task {task.id} in {root} (looked for: {tried}); {how_to_get(task)}")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"task {task.id} has several folders in {root} ({names}); keep one")
    return matches[0]


def read_txt_split(task_dir: Path, task: Task, split: str, *, check_files: bool = True) -> SplitFile:
    """Parse and validate `<task_dir>/<split>.txt`: line format, labels in [0, C), (optionally) files exist."""
    path = Path(task_dir) / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: task {task.id} needs split {split}; {how_to_get(task)}")
    raw = path.read_bytes()
    images: list[Path] = []
    labels: list[int] = []
    # utf-8-sig: a byte-order mark some editors put at the start of the file is not part of the first path.
    for lineno, line in enumerate(raw.decode("utf-8-sig", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected `relative/path.jpg label`, got {line.strip()!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{path}:{lineno}: label {label_text!r} is not an integer") from None
        if not 0 <= label < task.num_classes:
            raise DataError(
                f"{path}:{lineno}: label {label} is outside task {task.id}'s classes 0..{task.num_classes - 1}"
            )
        problem = escapes(rel)
        if problem:
            raise DataError(
                f"{path}:{lineno}: image path {rel!r} {problem}; list images by their path relative to the task "
                f"folder {task_dir} (e.g. images/000001.jpg), inside it"
            )
        image = Path(task_dir) / rel
        if check_files and not image.is_file():
            raise DataError(f"{path}:{lineno}: image {image} does not exist")
        images.append(image)
        labels.append(label)
    if not labels:
        raise DataError(f"{path} lists no images")
    return SplitFile(task, split, path, tuple(images), tuple(labels), hashlib.sha256(raw).hexdigest())


def escapes(rel: str) -> str | None:
    """Why the split-file path `rel` points outside its task folder, if it does (checked on the text alone).

    Absolute paths (POSIX or Windows) and paths whose `..` parts climb above the folder are refused, so a
    split file names only files inside its task folder. Symbolic links inside the folder are followed:
    whoever put them there chose where they lead.
    """
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).root:
        return "is absolute"
    depth = 0
    for part in rel.replace("\\", "/").split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return "leaves the task folder"
    return None


def _too_many_pixels(pixels: int | str) -> str:
    return (
        f"{pixels} pixels, over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS); "
        "shrink the image or remove it from its split file"
    )


def decode_image(path: Path, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Decode an image file to RGB and resize it straight to `size`×`size` (no crop); uint8 [3, S, S].

    Every mode Pillow opens is read as the pixel values the file means (`tasks.images.to_rgb`: high bit
    depths scaled to 8 bits, alpha dropped), or refused with a `DataError` naming the file; so is an image
    with more pixels than Pillow's decompression-bomb limit, before its pixels are decoded.
    """
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise ValueError(_too_many_pixels(im.width * im.height))
            im = to_rgb(im).resize((size, size), INTERPOLATIONS[interpolation])
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"cannot read image {path}: {_too_many_pixels(found[1] if found else 'more')}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `shorter`, the longer one in proportion, rounded
    down: the rule of torchvision's `Resize(int)`, which VPT's FGVC transforms use."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def image_dims(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header alone, or a `DataError` naming the file (also for an
    image over the decompression-bomb limit, as `decode_image`)."""
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise ValueError(_too_many_pixels(im.width * im.height))
            return im.width, im.height
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"cannot read image {path}: {_too_many_pixels(found[1] if found else 'more')}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def decode_shorter(path: Path, shorter: int, interpolation: str = "bicubic", crop: int | None = None) -> np.ndarray:
    """Decode an image file to RGB, resize its shorter side to `shorter` (`shorter_side_size`) and, with `crop`,
    cut the centre `crop`×`crop` square out of it (torchvision's `CenterCrop` offsets); uint8 [3, H, W].

    Modes and the decompression-bomb limit are handled as in `decode_image`.
    """
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise ValueError(_too_many_pixels(im.width * im.height))
            im = to_rgb(im)
            im = im.resize(shorter_side_size(im.width, im.height, shorter), INTERPOLATIONS[interpolation])
            if crop is not None:
                top, left = round((im.height - crop) / 2), round((im.width - crop) / 2)
                im = im.crop((left, top, left + crop, top + crop))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"cannot read image {path}: {_too_many_pixels(found[1] if found else 'more')}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
