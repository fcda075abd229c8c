"""Splits as arrays: decoded and resized once into a uint8 cache (`benchmark.data.cache`), served by one
LightningDataModule.

An epoch never decodes an image: each split is decoded once per (files, preprocessing) into arrays that later
runs memory-map. Batches leave the loader as uint8 and are normalised on the device by the LightningModule;
a `crop_flip` suite's training batches are cut out of the cached images per batch (random crops by slicing)
and flipped on the device (`benchmark.data.augment`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmark.core.paths import cache_location, check_cache_dir, check_space
from benchmark.data.augment import CropFlipDataset, flip_batch, gather_crops
from benchmark.data.cache import (
    NPY_HEADER,
    SplitArrays,
    cache_entry,
    cache_key,
    decode_into,
    decode_workers,
    decoder,
    entry_problem,
    index_path,
    index_problem,
    planned_index,
    split_layout,
)
from tasks import SplitFile, Task, find_task_dir, read_split

__all__ = ["SplitArrays", "TaskData", "VTABDataModule", "check_cache_space", "load_split_images", "scan_task"]


def default_cache_dir() -> Path:
    """`$PEFT_BENCH_CACHE/arrays`, or `~/.cache/peft-bench/arrays`."""
    return cache_location()[0]


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


def entry_check(split: SplitFile, image_size: int, path: Path, shape: tuple[int, ...]) -> str | None:
    """`entry_problem` of the split's entry, its index included for a `shorter` one."""
    if split_layout(split) == "shorter":
        problem = index_problem(index_path(path), len(split), image_size)
        if problem is not None:
            return problem and f"index {problem}"
    return entry_problem(path, shape)


def entry_bytes(shape: tuple[int, ...], n: int) -> int:
    """Disk bytes of a cache entry of `shape` (a flat one's index of `n` rows included)."""
    return math.prod(shape) + NPY_HEADER + (24 * n + NPY_HEADER if len(shape) == 1 else 0)


SPACE_ADVICE = "free some space, pass a smaller --image-size, or point --cache-dir (or $PEFT_BENCH_CACHE) elsewhere"


def check_cache_space(
    splits: list[SplitFile], image_size: int, interpolation: str = "bicubic", cache_dir: Path | None = None
) -> None:
    """Raise `UserError` unless the cache entries still to be decoded for `splits` fit on the cache's disk
    together, so a sweep or an install never stops for space half-way through decoding."""
    setting, cache_dir = cache_dir, check_cache_dir(cache_dir)
    todo = [(s, shape) for s in splits for path, shape in [cache_entry(s, image_size, interpolation, cache_dir)]
            if entry_check(s, image_size, path, shape) is not None]  # fmt: skip
    if todo:
        check_cache_dir(setting, writable=True)
        images = sum(len(s) for s, _ in todo)
        what = f"the image cache of {len(todo)} split(s) ({images} images at {image_size} px)"
        check_space(cache_dir, sum(entry_bytes(shape, len(s)) for s, shape in todo), what, SPACE_ADVICE)


def load_split_images(
    split: SplitFile, image_size: int, interpolation: str = "bicubic", cache_dir: Path | None = None, workers: int = 0
) -> SplitArrays:
    """The split's images as memory-mapped uint8 arrays, decoded on the first call and cached on disk, in the
    layout its suite needs (`cache.split_layout`).

    The arrays are written to temporary files and renamed into place, so an interrupted decode never
    leaves a cache entry that later loads as complete; an entry that is damaged anyway (truncated, another
    shape) is rebuilt, with one line on stderr. Disk space and memory are checked before anything is allocated.
    Pillow releases the GIL while decoding and resizing, so a thread pool uses every core.
    """
    setting, cache_dir = cache_dir, check_cache_dir(cache_dir)
    path, shape = cache_entry(split, image_size, interpolation, cache_dir)
    shorter = split_layout(split) == "shorter"
    problem = entry_check(split, image_size, path, shape)
    if problem is not None:
        if problem:
            print(f"image cache entry {path} {problem}; rebuilding it", file=sys.stderr, flush=True)
        what = f"the image cache of {split.task.id} {split.split} ({len(split)} images at {image_size} px)"
        check_cache_dir(setting, writable=True)
        check_space(cache_dir, entry_bytes(shape, len(split)), what, SPACE_ADVICE)
        index = (
            planned_index(split, image_size, cache_key(split, image_size, interpolation, "shorter"))
            if shorter
            else None
        )
        side = int(index[:, 1:].max()) if index is not None and len(index) else image_size
        workers = decode_workers(split, side, workers)
        cache_dir.mkdir(parents=True, exist_ok=True)
        decode_into(path, split, shape, decoder(split, image_size, interpolation), workers, index)
    labels = np.asarray(split.labels, np.int64)
    if shorter:
        index = np.load(index_path(path))
        return SplitArrays(split.split, np.load(path, mmap_mode="r"), labels, split.sha256, index, image_size)
    return SplitArrays(split.split, np.load(path, mmap_mode="r"), labels, split.sha256)


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
    evaluation split (the validation split when tuning, test for final runs) in order. uint8 image batches are
    normalised after they reach the device (`on_after_batch_transfer`), so the host only moves bytes.

    `on_device`: with `auto` (on a GPU, when both splits fit in a quarter of its free memory) or `on`, both
    splits are copied to the device once in `setup`; the loaders then serve index batches (the same
    sampler and generator, so the same batches) and `on_after_batch_transfer` gathers the images there.

    A training split cached uncropped (`SplitArrays.index`: a `crop_flip` suite) is served as random crops with
    flips (`augment.CropFlipDataset`, its draws seeded by `seed`), flipped (or, resident, cut) on the device.
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
        # split role -> (inputs, labels, index or None) on the device
        self.resident: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}

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

    def move_to(self, device: torch.device) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
        """Both splits as tensors on `device` (one copy each)."""
        return {
            role: (
                torch.from_numpy(np.asarray(a.inputs)).to(device),
                torch.from_numpy(a.labels).to(device),
                None if a.index is None else torch.from_numpy(a.index).to(device),
            )
            for role, a in (("train", self.train), ("eval", self.eval))
        }

    def _loader(self, role: str, arrays: SplitArrays, **kwargs) -> DataLoader:
        if arrays.index is not None:
            dataset = CropFlipDataset(arrays, self.seed, resident=role in self.resident)
        else:
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
        if self.eval.index is not None:
            raise ValueError(f"evaluation split {self.eval.name} is cached uncropped; it needs its centre crops")
        return self._loader("eval", self.eval, batch_size=self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Tensor):  # indices into the resident splits
            inputs, labels, _ = self.resident["train" if self.trainer.training else "eval"]
            batch = (inputs[batch], labels[batch])
        elif len(batch) == 4:  # indices and draws of random crops of the resident training split
            flat, labels, index = self.resident["train"]
            batch = (gather_crops(flat, index, self.train.crop, *batch), labels[batch[0]])
        elif len(batch) == 3:  # random crops, still to flip
            x, y, flips = batch
            batch = (flip_batch(x, flips), y)
        x, y = batch
        if x.dtype == torch.uint8:
            x = normalize(x, self.mean.to(x.device), self.std.to(x.device))
        return x, y


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float, scaled to [0, 1] and standardised per channel (on the images' device)."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
