"""The settings a results directory holds for one method and protocol: a file written once, under its claim.

Every run of a sweep shares its settings (backbone and weights, image size, precision, ...) and the method's
config as the user set it (`--set` options, the recipe's epochs, batch size, learning rate ...); what varies
between runs is the task (with the per-task values a method's paper sets, `MethodConfig.for_task`, and a task's
own recipe overrides such as `reproduce`'s scaled grid) and the seed. The first sweep into a directory writes
those shared settings, and the sha256 of each task's splits it trains on, to `runs/<method>/<protocol>.settings` (JSON);
every later sweep, whatever its launcher, compares its own with them before any run (a driver: before it submits
anything), under the file's claim, so that of two sweeps of different settings started together exactly one
goes on and the other stops with one line, having written nothing. Other tasks, seeds or methods with the same
settings add to the directory (a new task's splits are added to the file); `--rerun-stale` replaces what differs.

The comparison is the one resuming makes for each run (`resume.identity`, `resume.diff`), applied to the sweep
before any task's values; it catches what the per-run check cannot: runs of different settings at different paths
(other seeds, other tasks) that would otherwise end up side by side in one leaderboard row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from benchmark.core.errors import UserError
from benchmark.run.results import write_json
from benchmark.run.runner import Settings, SweepData
from benchmark.run.schema import SETTINGS
from benchmark.run.schema import problem as schema_problem
from benchmark.sweep.claims import claim_path, claimed, owner_label, read_owner
from benchmark.sweep.resume import diff, identity
from methods import MethodConfig

# How long a sweep waits for another that is writing the file (it holds the claim for a moment).
CLAIM_WAIT_S = 60.0


def settings_path(results: Path, method: str, protocol: str) -> Path:
    return Path(results) / "runs" / method / f"{protocol}.settings"


def sweep_identity(config: MethodConfig, protocol: str, settings: Settings, options: dict[str, str] | None,
                   recipe_overrides: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """What every run of the sweep shares, compared as resuming compares a run (`resume.identity`): the method's
    version and config with the user's options and recipe overrides but no task's values, and the run settings."""
    shared = config.with_options(dict(options or {})).with_recipe(**(recipe_overrides or {}))
    planned = {"method": config.name, "protocol": protocol, "method_version": config.version,
               "method_config": shared.to_dict(), **dataclasses.asdict(settings)}  # fmt: skip
    return identity(planned, deferred=True, grid=protocol == "grid")


def data_identity(data: SweepData) -> dict[str, dict[str, str]]:
    """The sha256 of every split the sweep loaded, by task."""
    return {task: {split: arrays.sha256 for split, arrays in sorted(splits.items())}
            for task, splits in sorted(data.arrays.items())}  # fmt: skip


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings file at `path` validated against `benchmark.run.schema.DirectorySettings` (None when absent)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or type(e).__name__}); check its permissions") from None
    try:
        SETTINGS.validate_json(text)
    except ValidationError as e:
        raise UserError(f"{path} is not a settings file of this project: {schema_problem(e)}; delete it (the next "
                        "sweep writes it again) if the results beside it are of the settings you sweep") from None  # fmt: skip
    return json.loads(text)


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    """Write a settings file atomically; one that violates the schema is a bug, raised before anything is written."""
    SETTINGS.validate_python(settings)
    write_json(path, settings)


def differences(stored: dict[str, Any], config: dict[str, Any], data: dict[str, dict[str, str]]) -> list[str]:
    """The settings in which a sweep differs from the stored ones (`key: stored -> sweep's`); a task's split
    compared only where both have it."""
    out = diff(stored["config"], config)
    for task, splits in data.items():
        theirs = stored["data"].get(task) or {}
        out += [f"data.{task}.{s}: sha256 {theirs[s][:12]}.. -> {h[:12]}.." for s, h in splits.items()
                if s in theirs and theirs[s] != h]  # fmt: skip
    return out


def refusal(path: Path, config: MethodConfig, protocol: str, changed: list[str]) -> UserError:
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return UserError(
        f"{path} holds the settings of every {protocol} run of {config.name} in this results directory, and this "
        f"sweep's differ ({'; '.join(changed[:3])}{more}); use another --results directory, or the directory's "
        "settings, or pass --rerun-stale to replace them"
    )


def precheck(results: Path, config: MethodConfig, *, protocol: str, settings: Settings,
             options: dict[str, str] | None = None, recipe_overrides: dict[str, Any] | None = None,
             rerun_stale: bool = False) -> None:  # fmt: skip
    """`check_directory`'s refusal, read-only and without the data: a command sweeping several methods checks
    them all before the first one's runs."""
    path = settings_path(results, config.name, protocol)
    stored = read_settings(path)
    if stored is None or rerun_stale:
        return
    if changed := diff(stored["config"], sweep_identity(config, protocol, settings, options, recipe_overrides)):
        raise refusal(path, config, protocol, changed)


def check_directory(results: Path, config: MethodConfig, *, protocol: str, settings: Settings, data: SweepData,
                    options: dict[str, str] | None = None, recipe_overrides: dict[str, Any] | None = None,
                    rerun_stale: bool = False) -> Path:  # fmt: skip
    """Compare the sweep's settings with those the directory holds for its method and protocol, under the file's
    claim: write them when there are none (or add the sweep's new tasks); UserError when they differ, unless
    `rerun_stale` (then the sweep's replace them). Returns the file's path."""
    path = settings_path(results, config.name, protocol)
    mine = {"config": sweep_identity(config, protocol, settings, options, recipe_overrides),
            "data": data_identity(data)}  # fmt: skip
    with claimed(path, wait=CLAIM_WAIT_S) as claim:
        if claim is None:
            owner = read_owner(claim_path(path)) or {}
            raise UserError(f"{path} is being written by {owner_label(owner)} for over "
                            f"{CLAIM_WAIT_S:.0f} s; run the same command again")  # fmt: skip
        stored = read_settings(path)
        if stored is not None and (changed := differences(stored, mine["config"], mine["data"])):
            if not rerun_stale:
                raise refusal(path, config, protocol, changed)
        elif stored is not None and all(stored["data"].get(t, {}).keys() >= s.keys() for t, s in mine["data"].items()):
            return path  # the same settings, every task already known: nothing to write
        data = {**(stored or {}).get("data", {})}
        for task, splits in mine["data"].items():
            data[task] = {**data.get(task, {}), **splits}
        write_settings(path, {"method": config.name, "protocol": protocol, "config": mine["config"], "data": data})
    return path
