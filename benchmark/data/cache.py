"""The uint8 image cache: each split decoded once per (files, preprocessing) into `.npy` files later runs memory-map.

Three layouts, chosen per split by its suite (`split_layout`):

- `resize` (suites without augmentation, VTAB-1k): every image resized straight to S×S, one array [N, 3, S, S].
- `center` (evaluation splits of `crop_flip` suites): the shorter side resized to R = floor(S / 0.875), then the
  centre S×S square: one array [N, 3, S, S].
- `shorter` (training splits of `crop_flip` suites): the shorter side resized to R and nothing cut, so each epoch
  can draw its own crop. The images differ in shape, so they lie back to back in one flat uint8 array (each
  [3, H, W], C-order) beside an index [N, 3] of (offset, height, width); the shapes come from the image files'
  headers, so the entry's size is known before anything is decoded.

Entries are written to temporary files and renamed into place (the index before the pixels, whose presence
marks the entry complete), and checked against their headers and sizes before use.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.core.errors import UserError
from benchmark.core.paths import available_memory, size_text
from tasks import DataError, SplitFile
from tasks.folder import decode_image, decode_shorter, image_dims, shorter_side_size

CACHE_VERSION = 2  # 2: high-bit-depth images scaled to 8 bits instead of clipped
# Memory one decoding thread holds per image side squared: Pillow keeps RGB at 4 bytes a pixel (the resized
# image and the intermediate of its two-pass resize), then the 3-byte numpy copy, and each thread's share of
# the decoded images waiting to be copied into the cache (DECODE_AHEAD per thread, 3 bytes a pixel).
DECODE_AHEAD = 2
NPY_HEADER = 4096  # bytes: more than any .npy header
DECODE_BYTES_PER_PIXEL = 4 + 4 + 3 + 3 * DECODE_AHEAD
# VPT's FGVC transforms resize the shorter side to the crop size / 0.875 (224 -> 256, 384 -> 438, 448 -> 512).
CROP_RATIO = 0.875
LAYOUTS = ("resize", "center", "shorter")


def resize_side(image_size: int) -> int:
    """The shorter side R a `crop_flip` suite resizes to before cropping `image_size` pixels."""
    return math.floor(image_size / CROP_RATIO)


def split_layout(split: SplitFile) -> str:
    """How the split is cached: `resize` without augmentation, else `shorter` for a split some run mode trains on
    and `center` for the others."""
    suite = split.task.suite_info
    if suite.augment == "none":
        return "resize"
    return "shorter" if split.split in {train for train, _ in suite.modes.values()} else "center"


def preprocessing(split: SplitFile, image_size: int, interpolation: str) -> dict[str, object]:
    """What the split's images went through before a batch is drawn, as a result records it."""
    layout, r = split_layout(split), resize_side(image_size)
    steps = {
        "resize": f"resize to {image_size}x{image_size}",
        "center": f"resize shorter side to {r}, centre crop {image_size}",
        "shorter": f"resize shorter side to {r}, random crop {image_size} and horizontal flip (p=0.5) per batch",
    }
    return {"layout": layout, "steps": steps[layout], "image_size": image_size, "interpolation": interpolation,
            **({} if layout == "resize" else {"resize": r})}  # fmt: skip


@dataclass
class SplitArrays:
    """A split held as arrays: uint8 images [N, 3, S, S] (or float features [N, D]) and int64 labels [N].

    A `shorter` split holds its images flat instead (`inputs` uint8 [total]), located by `index` [N, 3] of
    (offset, height, width); `crop` is the side its batches are cut to.
    """

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    sha256: str = ""
    index: np.ndarray | None = None
    crop: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def cache_key(split: SplitFile, image_size: int, interpolation: str, layout: str = "resize") -> str:
    # VTAB-1k's entries keep the key they had before layouts existed.
    tail = "" if layout == "resize" else f"|{layout}|{resize_side(image_size)}"
    h = hashlib.sha256(
        f"{CACHE_VERSION}|{split.path.resolve()}|{split.sha256}|{image_size}|{interpolation}{tail}".encode()
    )
    # File sizes and modification times: a replaced image invalidates the cache without hashing every byte.
    for image in split.images:
        st = image.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def entry_problem(path: Path, shape: tuple[int, ...], dtype: str = "uint8") -> str | None:
    """Why the cache entry at `path` cannot be used ("" when there is none), or None when it can.

    The `.npy` header is checked against the file's size: a truncated file (a copy cut short, a disk that
    filled up under another tool) would otherwise fail in `np.load` or serve garbage.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            if major not in (1, 2):
                return f"has .npy format version {major}, not 1 or 2"
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            stored, fortran, stored_dtype = read_header(f)
            expected = f.tell() + math.prod(stored) * stored_dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        return f"is unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})"
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    if tuple(stored) != shape or stored_dtype != np.dtype(dtype) or fortran:
        return f"holds {stored_dtype} {tuple(stored)}, not {dtype} {shape}"
    return None


def cache_entry(
    split: SplitFile, image_size: int, interpolation: str, cache_dir: Path
) -> tuple[Path, tuple[int, ...]]:
    """The path of the split's cache entry and the shape of its array ((total bytes,) for a `shorter` entry, whose
    index lies beside it: `index_path`)."""
    layout = split_layout(split)
    key = cache_key(split, image_size, interpolation, layout)
    if layout == "shorter":
        r = resize_side(image_size)
        path = cache_dir / f"{split.task.id}-{split.split}-{r}short-{interpolation}-{key}.npy"
        problem = index_problem(index_path(path), len(split), image_size)
        if problem is None:  # the entry's size is the index's; else from the images' headers
            return path, (int(index_total(np.load(index_path(path)))),)
        return path, (int(index_total(planned_index(split, image_size, key))),)
    tag = "" if layout == "resize" else f"-center{resize_side(image_size)}"
    path = cache_dir / f"{split.task.id}-{split.split}-{image_size}px{tag}-{interpolation}-{key}.npy"
    return path, (len(split), 3, image_size, image_size)


def index_path(path: Path) -> Path:
    """Where a `shorter` entry's index lies: beside its pixels."""
    return path.with_name(path.stem + ".index.npy")


def index_total(index: np.ndarray) -> int:
    """Bytes of the flat array an index locates."""
    return int(index[-1, 0] + 3 * index[-1, 1] * index[-1, 2]) if len(index) else 0


def shorter_index(split: SplitFile, resize: int) -> np.ndarray:
    """The index [N, 3] (offset, height, width) of the split's images with the shorter side resized to `resize`,
    from the files' headers (nothing is decoded)."""
    index = np.zeros((len(split), 3), np.int64)
    for i, image in enumerate(split.images):
        w, h = shorter_side_size(*image_dims(image), resize)
        index[i, 1:] = h, w
    sizes = 3 * index[:, 1] * index[:, 2]
    index[1:, 0] = np.cumsum(sizes)[:-1]
    return index


# Indexes read from image headers, by entry key: the space check and the decode that follows read them once.
_PLANNED: dict[str, np.ndarray] = {}


def planned_index(split: SplitFile, image_size: int, key: str) -> np.ndarray:
    """`shorter_index` of the split for the entry whose key is `key` (read once per process)."""
    if key not in _PLANNED:
        _PLANNED[key] = shorter_index(split, resize_side(image_size))
    return _PLANNED[key]


def index_problem(path: Path, n: int, crop: int) -> str | None:
    """Like `entry_problem`, for a `shorter` entry's index: its shape, and offsets that follow the shapes, each
    image at least `crop` pixels on both sides."""
    problem = entry_problem(path, (n, 3), "int64")
    if problem is not None:
        return problem
    index = np.load(path)
    sizes = 3 * index[:, 1] * index[:, 2]
    if n and (index[0, 0] != 0 or (index[1:, 0] != np.cumsum(sizes)[:-1]).any() or (index[:, 1:] < crop).any()):
        return "holds an index whose offsets do not follow its image shapes"
    return None


def decode_workers(split: SplitFile, side: int, workers: int) -> int:
    """Decoding threads that fit in the available memory (at most `workers`), or a `UserError` saying how much one
    needs, before anything is allocated. `side`: the largest side an image is decoded to."""
    workers = workers or min(8, os.cpu_count() or 1)
    per_thread = DECODE_BYTES_PER_PIXEL * side**2
    available = available_memory()
    if available is None:
        return workers
    if per_thread > available:
        raise UserError(
            f"decoding {split.task.id} {split.split} at {side} px needs about {size_text(per_thread)} of memory, "
            f"and {size_text(available)} is available; pass a smaller --image-size"
        )
    return min(workers, available // per_thread)


def decoder(split: SplitFile, image_size: int, interpolation: str) -> Callable[[Path], np.ndarray]:
    """The function that decodes one of the split's images for its layout."""
    layout, r = split_layout(split), resize_side(image_size)
    if layout == "resize":
        return lambda p: decode_image(p, image_size, interpolation)
    crop = image_size if layout == "center" else None
    return lambda p: decode_shorter(p, r, interpolation, crop)


def decode_into(
    path: Path,
    split: SplitFile,
    shape: tuple[int, ...],
    decode: Callable[[Path], np.ndarray],
    workers: int,
    index: np.ndarray | None = None,
) -> None:
    """Decode the split into a new `.npy` at `path`: written to a temporary file, its blocks reserved first
    (a full disk is then an `OSError` here, not a SIGBUS while writing the mapping), and renamed into place.
    With `index` (a `shorter` entry), image i fills its slice of the flat array, and the index is written first."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
        # In slices, so at most DECODE_AHEAD decoded images per thread wait to be copied into the mapping
        # (`Executor.map` would decode the whole split ahead).
        step = workers * DECODE_AHEAD
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(split.images), step):
                batch = split.images[start : start + step]
                for i, image in enumerate(pool.map(decode, batch), start):
                    if index is None:
                        out[i] = image
                        continue
                    offset, h, w = index[i]
                    if image.shape != (3, h, w):  # the header said otherwise
                        raise DataError(
                            f"image {split.images[i]} decoded to {image.shape[1:]}, its header says {h, w}"
                        )
                    out[offset : offset + image.size] = image.reshape(-1)
        out.flush()
        del out
        if index is not None:
            _save_atomic(index_path(path), index)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
