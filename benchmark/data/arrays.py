"""Splits as arrays: decoded and resized once into a uint8 cache, served by one LightningDataModule.

An epoch never decodes an image: each split is decoded once per (files, size, interpolation) into a
`.npy` array [N, 3, S, S] that later runs memory-map. Batches leave the loader as uint8 and are
normalised on the device by the LightningModule.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmark.core.errors import UserError
from benchmark.core.paths import available_memory, cache_location, check_cache_dir, check_space, size_text
from tasks import SplitFile, Task, decode_image, find_task_dir, read_split

CACHE_VERSION = 2  # 2: high-bit-depth images scaled to 8 bits instead of clipped
# Memory one decoding thread holds per image side squared: Pillow keeps RGB at 4 bytes a pixel (the resized
# image and the intermediate of its two-pass resize), then the 3-byte numpy copy, and each thread's share of
# the decoded images waiting to be copied into the cache (DECODE_AHEAD per thread, 3 bytes a pixel).
DECODE_AHEAD = 2
NPY_HEADER = 4096  # bytes: more than any .npy header
DECODE_BYTES_PER_PIXEL = 4 + 4 + 3 + 3 * DECODE_AHEAD


def default_cache_dir() -> Path:
    """`$PEFT_BENCH_CACHE/arrays`, or `~/.cache/peft-bench/arrays`."""
    return cache_location()[0]


@dataclass
class SplitArrays:
    """A split held as arrays: uint8 images [N, 3, S, S] (or float features [N, D]) and int64 labels [N]."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    """A validated task folder and its parsed split files."""

    task: Task
    dir: Path
    splits: dict[str, SplitFile]


def scan_task(root: Path, task: Task, splits: tuple[str, ...]) -> TaskData:
    """Find the task's folder and parse and validate each requested split (raises `DataError`)."""
    task_dir = find_task_dir(root, task)
    return TaskData(task, task_dir, {s: read_split(task_dir, task, s) for s in splits})


def _cache_key(split: SplitFile, image_size: int, interpolation: str) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{split.path.resolve()}|{split.sha256}|{image_size}|{interpolation}".encode())
    # File sizes and modification times: a replaced image invalidates the cache without hashing every byte.
    for image in split.images:
        st = image.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def entry_problem(path: Path, shape: tuple[int, ...]) -> str | None:
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
            stored, fortran, dtype = read_header(f)
            expected = f.tell() + math.prod(stored) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        return f"is unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})"
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    if tuple(stored) != shape or dtype != np.uint8 or fortran:
        return f"holds {dtype} {tuple(stored)}, not uint8 {shape}"
    return None


def cache_entry(
    split: SplitFile, image_size: int, interpolation: str, cache_dir: Path
) -> tuple[Path, tuple[int, ...]]:
    """The path of the split's cache entry and the shape of its array."""
    key = _cache_key(split, image_size, interpolation)
    path = cache_dir / f"{split.task.id}-{split.split}-{image_size}px-{interpolation}-{key}.npy"
    return path, (len(split), 3, image_size, image_size)


SPACE_ADVICE = "free some space, pass a smaller --image-size, or point --cache-dir (or $PEFT_BENCH_CACHE) elsewhere"


def check_cache_space(
    splits: list[SplitFile], image_size: int, interpolation: str = "bicubic", cache_dir: Path | None = None
) -> None:
    """Raise `UserError` unless the cache entries still to be decoded for `splits` fit on the cache's disk
    together, so a sweep or an install never stops for space half-way through decoding."""
    setting, cache_dir = cache_dir, check_cache_dir(cache_dir)
    todo = [e for e in (cache_entry(s, image_size, interpolation, cache_dir) for s in splits)
            if entry_problem(*e) is not None]  # fmt: skip
    if todo:
        check_cache_dir(setting, writable=True)
        images = sum(shape[0] for _, shape in todo)
        what = f"the image cache of {len(todo)} split(s) ({images} images at {image_size} px)"
        check_space(cache_dir, sum(math.prod(shape) + NPY_HEADER for _, shape in todo), what, SPACE_ADVICE)


def decode_workers(split: SplitFile, image_size: int, workers: int) -> int:
    """Decoding threads that fit in the available memory (at most `workers`), or a `UserError` saying how much one
    needs, before anything is allocated."""
    workers = workers or min(8, os.cpu_count() or 1)
    per_thread = DECODE_BYTES_PER_PIXEL * image_size**2
    available = available_memory()
    if available is None:
        return workers
    if per_thread > available:
        raise UserError(
            f"decoding {split.task.id} {split.split} at {image_size} px needs about {size_text(per_thread)} of memory, "
            f"and {size_text(available)} is available; pass a smaller --image-size"
        )
    return min(workers, available // per_thread)


def decode_into(path: Path, split: SplitFile, shape: tuple[int, ...], interpolation: str, workers: int) -> None:
    """Decode the split into a new `.npy` at `path`: written to a temporary file, its blocks reserved first
    (a full disk is then an `OSError` here, not a SIGBUS while writing the mapping), and renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
        size = shape[-1]
        # In slices, so at most DECODE_AHEAD decoded images per thread wait to be copied into the mapping
        # (`Executor.map` would decode the whole split ahead).
        step = workers * DECODE_AHEAD
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(split.images), step):
                batch = split.images[start : start + step]
                for i, image in enumerate(pool.map(lambda p: decode_image(p, size, interpolation), batch), start):
                    out[i] = image
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_split_images(
    split: SplitFile, image_size: int, interpolation: str = "bicubic", cache_dir: Path | None = None, workers: int = 0
) -> SplitArrays:
    """The split's images as a memory-mapped uint8 array, decoded on the first call and cached on disk.

    The array is written to a temporary file and renamed into place, so an interrupted decode never
    leaves a cache entry that later loads as complete; an entry that is damaged anyway (truncated, another
    shape) is rebuilt, with one line on stderr. Disk space and memory are checked before anything is allocated.
    Pillow releases the GIL while decoding and resizing, so a thread pool uses every core.
    """
    setting, cache_dir = cache_dir, check_cache_dir(cache_dir)
    path, shape = cache_entry(split, image_size, interpolation, cache_dir)
    problem = entry_problem(path, shape)
    if problem is not None:
        if problem:
            print(f"image cache entry {path} {problem}; rebuilding it", file=sys.stderr, flush=True)
        what = f"the image cache of {split.task.id} {split.split} ({len(split)} images at {image_size} px)"
        check_cache_dir(setting, writable=True)
        check_space(cache_dir, math.prod(shape) + NPY_HEADER, what, SPACE_ADVICE)
        workers = decode_workers(split, image_size, workers)
        cache_dir.mkdir(parents=True, exist_ok=True)
        decode_into(path, split, shape, interpolation, workers)
    return SplitArrays(split.split, np.load(path, mmap_mode="r"), np.asarray(split.labels, np.int64), split.sha256)


class ArrayDataset(Dataset):
    """Batches straight out of arrays: `__getitems__` fetches a whole batch with one fancy index."""

    def __init__(self, arrays: SplitArrays) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.arrays.inputs[idx])), torch.from_numpy(
            self.arrays.labels[idx]
        )


class IndexDataset(Dataset):
    """Batches of indices, for splits already on the device (`VTABDataModule(on_device=...)`)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


def _already_batched(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch


class VTABDataModule(pl.LightningDataModule):
    """One task's training split and evaluation split, as arrays (images or cached features).

    `train_dataloader` shuffles with a generator seeded by `seed`; `test_dataloader` serves the
    evaluation split (val200 when tuning, test for final runs) in order. uint8 image batches are
    normalised after they reach the device (`on_after_batch_transfer`), so the host only moves bytes.

    `on_device`: with `auto` (on a GPU, when both splits fit in a quarter of its free memory) or `on`, both
    splits are copied to the device once in `setup`; the loaders then serve index batches (the same
    sampler and generator, so the same batches) and `on_after_batch_transfer` gathers the images there.
    """

    def __init__(
        self,
        train: SplitArrays,
        eval: SplitArrays,
        *,
        batch_size: int,
        eval_batch_size: int = 256,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        on_device: str = "off",
    ) -> None:
        super().__init__()
        if on_device not in ("auto", "on", "off"):
            raise ValueError(f"on_device must be auto, on or off, got {on_device!r}")
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.train, self.eval = train, eval
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.drop_last, self.seed, self.num_workers = drop_last, seed, num_workers
        self.on_device = on_device
        self.resident: dict[str, tuple[Tensor, Tensor]] = {}  # split role -> (inputs, labels) on the device

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.resident = self.move_to(device) if self._fits(device) else {}

    def _fits(self, device: torch.device) -> bool:
        if self.on_device == "on":
            return True
        if self.on_device == "off" or device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return self.train.inputs.nbytes + self.eval.inputs.nbytes <= free // 4

    def move_to(self, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
        """Both splits as tensors on `device` (one copy each)."""
        return {
            role: (torch.from_numpy(np.asarray(a.inputs)).to(device), torch.from_numpy(a.labels).to(device))
            for role, a in (("train", self.train), ("eval", self.eval))
        }

    def _loader(self, role: str, arrays: SplitArrays, **kwargs) -> DataLoader:
        dataset = IndexDataset(len(arrays)) if role in self.resident else ArrayDataset(arrays)
        return DataLoader(dataset, collate_fn=_already_batched, num_workers=self.num_workers, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            "train",
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last and len(self.train) > self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader("eval", self.eval, batch_size=self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Tensor):  # indices into the resident splits
            inputs, labels = self.resident["train" if self.trainer.training else "eval"]
            batch = (inputs[batch], labels[batch])
        x, y = batch
        if x.dtype == torch.uint8:
            x = normalize(x, self.mean.to(x.device), self.std.to(x.device))
        return x, y


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float, scaled to [0, 1] and standardised per channel (on the images' device)."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
