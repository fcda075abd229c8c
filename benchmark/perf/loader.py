"""`python -m benchmark perf`: throughput measurements. Mode `--data`: the cached loader against decoding.

The cached loader is what training uses: `VTABDataModule.train_dataloader()` over the uint8 arrays of
`load_split_images`, each batch moved to the device and normalised there by the DataModule's
`on_after_batch_transfer`. The baseline decodes and resizes every image file each epoch
(`tasks.folder.decode_image`), then normalises each batch the same way. Both run through the same
DataLoader settings (batch size, workers, shuffling), one epoch of each in turn, so the ratio is
measured side by side under the same conditions.

On a training split of a `crop_flip` suite (FGVC) both loaders augment: the cached one cuts a random crop out
of the cached resized image and flips it on the device per batch (`benchmark.data.augment`); the baseline
decodes, resizes the shorter side, crops and flips every image each epoch, as VPT's transforms do. The default
measures a VTAB-1k task and an FGVC one, so the cost of the augmentation shows beside the plain loader.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmark.core.device import sync
from benchmark.core.errors import UserError
from benchmark.data.arrays import VTABDataModule, load_split_images, normalize
from benchmark.data.cache import resize_side, split_layout
from tasks import DataError, SplitFile, Task, decode_image, find_task_dir, read_split
from tasks.folder import decode_shorter

# The synthetic task written when no data root is given: source images of this side, per_class images per class.
SYNTH_IMAGE_SIZE = 128
SYNTH_PER_CLASS = 32


class DecodingDataset(Dataset):
    """The baseline: every item decoded from its file and resized on each access (on a `shorter` split: the
    shorter side resized, then a random crop and a flip, as VPT's training transforms)."""

    def __init__(self, split: SplitFile, image_size: int, interpolation: str, seed: int = 0) -> None:
        self.split, self.image_size, self.interpolation = split, image_size, interpolation
        self.augment = split_layout(split) == "shorter"
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, s = self.split.images[index], self.image_size
        if self.augment:
            image = decode_shorter(path, resize_side(s), self.interpolation)
            top, left = (int(self.rng.integers(0, side - s + 1)) for side in image.shape[1:])
            image = image[:, top : top + s, left : left + s]
            if self.rng.random() < 0.5:
                image = image[:, :, ::-1]
        else:
            image = decode_image(path, s, self.interpolation)
        # A contiguous, writable copy, as a usual image-to-tensor transform makes.
        return torch.from_numpy(np.array(image, order="C")), self.split.labels[index]


def _epoch(batches: Iterator, to_device: Callable, device: torch.device) -> tuple[int, float]:
    """Images served and seconds taken for one pass over `batches`, each batch finished on the device."""
    sync(device)
    start = time.perf_counter()
    n = 0
    for batch in batches:
        _, y = to_device(*batch)
        n += len(y)
    sync(device)
    return n, time.perf_counter() - start


def measure(
    split: SplitFile,
    *,
    image_size: int,
    batch_size: int,
    epochs: int,
    workers: int = 0,
    interpolation: str = "bicubic",
    normalization: str = "imagenet",
    cache_dir: Path | None = None,
    device: torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Images per second of the cached loader and of decoding, over `epochs` epochs each, interleaved."""
    from benchmark.run.backbone import NORMALIZATIONS

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = NORMALIZATIONS[normalization]
    start = time.perf_counter()
    arrays = load_split_images(split, image_size, interpolation, cache_dir)
    cache_s = time.perf_counter() - start
    dm = VTABDataModule(arrays, arrays, batch_size=batch_size, seed=seed, num_workers=workers, mean=mean, std=std)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    def cached_to_device(*batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (images, labels), plus the flips of random crops: `flip_batch` then runs on the device
        return dm.on_after_batch_transfer(tuple(t.to(device, non_blocking=True) for t in batch), 0)

    def decoded_to_device(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(x.to(device, non_blocking=True), mean_t, std_t), y.to(device, non_blocking=True)

    decoding = DecodingDataset(split, image_size, interpolation, seed)
    totals = {"cached": [0, 0.0], "decode": [0, 0.0]}
    for epoch in range(epochs):
        n, s = _epoch(iter(dm.train_dataloader()), cached_to_device, device)
        totals["cached"][0] += n
        totals["cached"][1] += s
        loader = DataLoader(
            decoding,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed + epoch),
            num_workers=workers,
        )
        n, s = _epoch(iter(loader), decoded_to_device, device)
        totals["decode"][0] += n
        totals["decode"][1] += s
    cached = totals["cached"][0] / max(totals["cached"][1], 1e-9)
    decoded = totals["decode"][0] / max(totals["decode"][1], 1e-9)
    return {
        "task": split.task.id,
        "suite": split.task.suite,
        "split": split.split,
        "augment": "random crop + flip" if arrays.index is not None else "none",
        "images": len(split),
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "device": str(device),
        "cached_images_per_s": round(cached, 1),
        "decode_images_per_s": round(decoded, 1),
        "ratio": round(cached / decoded, 2) if decoded > 0 else float("inf"),
        "cache_build_s": round(cache_s, 3),
    }


@contextmanager
def _synthetic_root(tasks: list[Task]) -> Iterator[Path]:
    from tasks.synth import SynthConfig, write_task
    from tasks.synth_fgvc import write_fgvc_task

    with tempfile.TemporaryDirectory(prefix="peft-bench-perf-") as tmp:
        root = Path(tmp) / "data"
        for task in tasks:
            if task.suite_info.layout == "json":  # about as many images as a 10-class VTAB-1k task's
                per_class = max(1, SYNTH_PER_CLASS * 10 // task.num_classes)
                write_fgvc_task(root, task, SynthConfig(per_class=per_class, image_size=SYNTH_IMAGE_SIZE, seed=0))
            else:
                write_task(root, task, SynthConfig(per_class=SYNTH_PER_CLASS, image_size=SYNTH_IMAGE_SIZE, seed=0))
        yield Path(tmp)


def data_perf(
    tasks: list[Task],
    *,
    data_root: Path | None,
    split: str | None = None,
    image_size: int = 224,
    batch_size: int = 64,
    epochs: int = 3,
    workers: int = 0,
    interpolation: str = "bicubic",
    cache_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """One measurement per task; without `data_root`, on synthetic tasks in a temporary folder (and cache).
    `split`: the split measured (default: each task's final training split, e.g. train800val200 or train)."""
    settings = dict(
        image_size=image_size, batch_size=batch_size, epochs=epochs, workers=workers, interpolation=interpolation
    )
    try:
        if data_root is None:
            with _synthetic_root(tasks) as tmp:
                rows = []
                for task in tasks:
                    split_file = read_split(find_task_dir(tmp / "data", task), task, split or task.suite_info.final[0])
                    rows.append({"data": "synthetic", **measure(split_file, cache_dir=tmp / "cache", **settings)})
                return rows
        rows = []
        for task in tasks:
            split_file = read_split(find_task_dir(data_root, task), task, split or task.suite_info.final[0])
            rows.append({"data": str(data_root), **measure(split_file, cache_dir=cache_dir, **settings)})
        return rows
    except DataError as e:
        raise UserError(str(e)) from None


def format_rows(rows: list[dict[str, Any]]) -> str:
    from benchmark.data.vtab import format_table

    table = [
        {
            "task": r["task"],
            "split": r["split"],
            "augment": r["augment"],
            "images": r["images"],
            "epochs": r["epochs"],
            "size": r["image_size"],
            "batch": r["batch_size"],
            "device": r["device"],
            "cached img/s": round(r["cached_images_per_s"]),
            "decode img/s": round(r["decode_images_per_s"]),
            "ratio": f"{r['ratio']:.1f}x",
        }
        for r in rows
    ]
    return format_table(table)
