"""VPT's FGVC training augmentation on cached images: a random crop and a horizontal flip per image, per batch.

The cached training images have their shorter side resized already (`cache` layout `shorter`), so an epoch
only draws, for each image of a batch, a crop offset (uniform over every position, as torchvision's
`RandomCrop`) and a flip (p = 0.5, as `RandomHorizontalFlip`). The crop is a slice of the memory-mapped array
on the host (or a gather on the device when the split lies there); the flip is applied on the device.
torchvision's transforms work on one decoded image at a time, which is what the cache exists to avoid, so
this is written here over the cache's flat layout.

The draws come from a generator seeded by the run's seed and advance in batch order (the runner's loaders
have no worker processes), so a seed gives the same crops and flips every time. In a DataLoader worker the
generator is reseeded from the worker's seed (drawn from the loader's seeded generator each epoch), so
workers neither repeat each other's draws nor lose reproducibility.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from benchmark.data.cache import SplitArrays


class CropFlipDataset(Dataset):
    """Batches of random crops of a `shorter` split, with the flips still to apply on the device.

    `__getitems__` returns (uint8 crops [B, 3, S, S], labels [B], flips [B] bool), or with `resident` (the
    split's arrays are on the device: `gather_crops` cuts them there) (indices, tops, lefts, flips), from the
    same draws, so both give the same batches.
    """

    def __init__(self, arrays: SplitArrays, seed: int, *, resident: bool = False) -> None:
        if arrays.index is None:
            raise ValueError(f"split {arrays.name} is not cached uncropped (no index)")
        self.arrays, self.resident = arrays, resident
        self.rng = np.random.default_rng(seed)
        self.worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.__getitems__([index])

    def draw(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tops, lefts, flips) for the images `idx`: crop offsets uniform in [0, side - S], flips p = 0.5."""
        info = get_worker_info()
        if info is not None and info.seed != self.worker_seed:
            self.rng, self.worker_seed = np.random.default_rng(info.seed), info.seed
        shapes = self.arrays.index[idx, 1:]
        room = shapes - self.arrays.crop + 1
        tops, lefts = self.rng.integers(0, room[:, 0]), self.rng.integers(0, room[:, 1])
        flips = self.rng.random(len(idx)) < 0.5
        return tops, lefts, flips

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx = np.asarray(indices, dtype=np.int64)
        tops, lefts, flips = self.draw(idx)
        labels = torch.from_numpy(self.arrays.labels[idx])
        if self.resident:
            return torch.from_numpy(idx), torch.from_numpy(tops), torch.from_numpy(lefts), torch.from_numpy(flips)
        s, flat = self.arrays.crop, self.arrays.inputs
        out = np.empty((len(idx), 3, s, s), np.uint8)
        for k, (i, top, left) in enumerate(zip(idx, tops, lefts, strict=True)):
            offset, h, w = self.arrays.index[i]
            out[k] = flat[offset : offset + 3 * h * w].reshape(3, h, w)[:, top : top + s, left : left + s]
        return torch.from_numpy(out), labels, torch.from_numpy(flips)


def flip_batch(images: Tensor, flips: Tensor) -> Tensor:
    """`images` [B, C, H, W] with those where `flips` is true mirrored left to right."""
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


def gather_crops(
    flat: Tensor, index: Tensor, crop: int, idx: Tensor, tops: Tensor, lefts: Tensor, flips: Tensor
) -> Tensor:
    """The crops [B, 3, S, S] of images `idx` out of a flat split on the device (one gather, the flip folded
    into its column order): the same pixels `CropFlipDataset` slices on the host, then `flip_batch`."""
    offset, h, w = (index[idx, k].view(-1, 1, 1, 1) for k in range(3))
    channel = torch.arange(3, device=flat.device).view(1, 3, 1, 1)
    row = torch.arange(crop, device=flat.device).view(1, 1, crop, 1) + tops.view(-1, 1, 1, 1)
    col = torch.arange(crop, device=flat.device).view(1, 1, 1, crop)
    col = torch.where(flips.view(-1, 1, 1, 1), crop - 1 - col, col) + lefts.view(-1, 1, 1, 1)
    return flat[offset + channel * h * w + row * w + col]
