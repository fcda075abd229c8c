"""Whether a result file already on disk stands for a planned run, so that a sweep resumes instead of re-running
it, and refuses to mix results of different configurations or data under one path.

A result trained under another version of its method's training semantics (`method_version` in its config,
`MethodConfig.version`; absent in results written before versions existed) is stale, whatever its method
config says (the change may be a default, such as an initialisation): refused unless `--rerun-stale`, which
reruns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmark.run.results import read_result
from benchmark.run.runner import NOT_IDENTITY, RunSpec, SweepData
from benchmark.run.splits import mode_splits

# The parts of a run's config that earlier stages decide.
DECIDED = ("selection", "pruning", "decisions")


def identity(config: dict[str, Any], *, deferred: bool, grid: bool) -> dict[str, Any]:
    """A stored or planned run config as compared for resuming (through JSON, as stored: tuples become lists).

    A run planned before an earlier stage decides part of its config (the grid's lr and weight decay, a
    pruning stage's candidate, the hashes of the decision files) is compared without those parts (`deferred`):
    that is how a sweep checks its runs before the decisions exist; once they do, every run is compared whole.
    """
    config = json.loads(json.dumps(config))
    for key in NOT_IDENTITY:
        config.pop(key, None)
    if deferred:
        for key in DECIDED:
            config.pop(key, None)
        if grid:
            for key in ("lr", "weight_decay"):
                config.get("method_config", {}).get("recipe", {}).pop(key, None)
    return config


def conflict(
    path: Path, spec: RunSpec, data: SweepData, *, deferred: bool = False, rerun_stale: bool = False
) -> str | None:
    """Why an existing result at `path` cannot stand for `spec` (None when it can, or when there is none, or when
    it is stale by its method's version and `rerun_stale` lets the sweep rerun it)."""
    record = read_result(path)
    if record is None:
        return None
    if why := stale_version(record, path, spec, data, deferred=deferred):
        return None if rerun_stale else f"{why}: pass --rerun-stale to rerun it"
    if split := _data_differs(record, spec, data):
        return f"{path} was produced from a different {split}.txt of {spec.task.id} (its sha256 differs)"
    grid = spec.protocol == "grid"
    old = identity(record.get("config", {}), deferred=deferred, grid=grid)
    new = identity(spec.config_dict(), deferred=deferred, grid=grid)
    if old == new:
        return None
    return f"{path} was produced with a different configuration ({'; '.join(diff(old, new)[:3])})"


def stale_version(
    record: dict[str, Any], path: Path, spec: RunSpec, data: SweepData, *, deferred: bool = False
) -> str | None:
    """Why `record`, the result stored at `path`, is stale: trained under another version of the method's training
    semantics, on the same data and with the same run settings (the method config is not compared: the new version
    may have changed a default). None otherwise (the same version, or a result that conflicts otherwise)."""
    stored = record.get("config") or {}
    old, new = stored.get("method_version"), spec.config.version
    if old == new or _data_differs(record, spec, data):
        return None
    grid = spec.protocol == "grid"
    skip = ("method_version", "method_config")
    rest = [{k: v for k, v in identity(c, deferred=deferred, grid=grid).items() if k not in skip}
            for c in (stored, spec.config_dict())]  # fmt: skip
    if rest[0] != rest[1]:
        return None
    was = "a result that records no version" if old is None else f"version {old}"
    return f"{path} was trained before {spec.config.name}'s training semantics changed (from {was} to version {new})"


def _data_differs(record: dict[str, Any], spec: RunSpec, data: SweepData) -> str | None:
    """The split the stored result was produced from a different file of (None: the same data)."""
    splits = data.arrays[spec.task.id]
    for role, split in zip(("train_split", "eval_split"), mode_splits(spec.task, spec.mode), strict=True):
        if record.get("data", {}).get(role, {}).get("sha256") != splits[split].sha256:
            return split
    return None


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            out += diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
