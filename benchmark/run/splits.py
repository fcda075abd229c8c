"""Which splits a run reads, per its task's suite (`tasks.suites.Suite`), and the decoded splits of a sweep.

A run mode (`tune`, `final`) trains on one split and evaluates another; a protocol reads the splits of its
modes (`grid`: tune, then final). VTAB-1k: train800 -> val200, train800val200 -> test. FGVC: train -> val,
train -> test (the same split, decoded once).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError
from benchmark.data.arrays import SplitArrays, TaskData, check_cache_space, load_split_images, scan_task
from tasks import DataError, Task


def mode_splits(task: Task, mode: str) -> tuple[str, str]:
    """(train split, evaluation split) of a run of `task` in `mode` (`tune` or `final`)."""
    return task.suite_info.modes[mode]


def protocol_splits(task: Task, protocol: str) -> tuple[str, ...]:
    """Every split a protocol (`final`, `tune` or `grid`; a mode's name is its protocol's) reads on `task`."""
    if protocol == "grid":
        return task.suite_info.protocol_splits
    return mode_splits(task, protocol)


@dataclass
class SweepData:
    """Decoded splits of every task of a sweep, plus features cached for frozen-feature methods."""

    tasks: dict[str, TaskData]
    arrays: dict[str, dict[str, SplitArrays]]
    features: dict[tuple[str, str], SplitArrays] = field(default_factory=dict)


def prepare_data(
    root: Path, tasks: Iterable[Task], protocol: str, settings: Any, cache_dir: Path | None = None
) -> SweepData:
    """Validate every task's split files for `protocol` (`protocol_splits`), then decode (or load from the cache)
    every split needed. `settings`: the sweep's `runner.Settings` (image size and interpolation).

    All validation happens before any decode, and all decoding before any training, so a data problem
    stops the sweep before its first run.
    """
    try:
        scanned = {t.id: scan_task(Path(root), t, protocol_splits(t, protocol)) for t in tasks}
        check_cache_space([f for td in scanned.values() for f in td.splits.values()], settings.image_size,
                          settings.interpolation, cache_dir)  # fmt: skip
        arrays = {
            tid: {
                s: load_split_images(f, settings.image_size, settings.interpolation, cache_dir)
                for s, f in td.splits.items()
            }
            for tid, td in scanned.items()
        }
    except DataError as e:
        raise UserError(str(e)) from None
    return SweepData(scanned, arrays)
