"""A planned run, and the error of a stage that cannot run because an earlier one failed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.run.runner import RunSpec


class StageError(RuntimeError):
    """An earlier stage of a task's pipeline failed, so its later stages cannot run."""


@dataclass
class Plan:
    """One planned run: its spec and where its result goes."""

    spec: RunSpec
    path: Path
