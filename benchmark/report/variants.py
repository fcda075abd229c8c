"""Which configuration a result ran under, as far as a leaderboard row is concerned.

A row of the leaderboard (and a block of `compare`) averages one method's runs under one protocol and
budget. Runs of one row must share their configuration: two sweeps with different settings written into
one results directory (say 2 and 3 epochs, on different tasks) would otherwise be averaged into one row
without a word. What may differ within a row is what the method sets per task (its per-task defaults,
e.g. VPT's prompt length) and what the grid protocol selects (lr and weight decay, and the grid itself,
which the suite scales per task); everything else (backbone, weights, image size, preprocessing,
precision, recipe, the method's options) must be equal. Runs that differ in it are put in separate rows,
each labelled with what sets it apart.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Settings fields that change a run's speed only (`runner.SPEED_ONLY`), and the fields of the run itself.
_NOT_CONFIGURATION = {"eval_batch_size", "compile", "data_on_device", "method", "task", "seed", "protocol", "mode"}
_NOT_CONFIGURATION |= {"budget", "selection", "pruning", "method_config"}
_GRID_SELECTED = {"recipe.lr", "recipe.weight_decay", "recipe.lr_grid", "recipe.wd_grid"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, list | tuple) else value
    return out


@functools.cache
def per_task_keys(method: str) -> frozenset[str]:
    """The config fields (flattened) that the method itself sets differently for some of the 19 tasks."""
    import methods
    from tasks import TASKS

    try:
        cls = methods.get_method(method)
    except KeyError:
        return frozenset()
    values: dict[str, set[str]] = {}
    for task in TASKS:
        for key, value in _flatten(json.loads(json.dumps(cls().for_task(task.id).to_dict()))).items():
            values.setdefault(key, set()).add(repr(value))
    return frozenset(k for k, v in values.items() if len(v) > 1)


def descriptor(record: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration as far as its row goes (flattened `key -> value`): the run's settings and its
    method config, less the fields its method sets per task and, under the grid protocol, what the grid
    selects."""
    config = record.get("config") or {}
    out = _flatten({k: v for k, v in config.items() if k not in _NOT_CONFIGURATION})
    skip = per_task_keys(record["method"]) | (_GRID_SELECTED if record.get("protocol") == "grid" else set())
    method_config = _flatten(json.loads(json.dumps(config.get("method_config") or {})))
    out.update({k: v for k, v in method_config.items() if k not in skip})
    return out


def variant_labels(records: list[dict[str, Any]], groups: list[tuple[Any, ...]]) -> list[str]:
    """For each record, what sets its configuration apart within its group ("" when its group is uniform).

    `groups[i]` is record i's row key (method, protocol, budget). Within a group, every key whose value is not
    the same for all records is listed, `key=value` in key order, so runs under equal configurations get equal
    labels and rows split exactly where the configuration does.
    """
    described = [descriptor(r) for r in records]
    by_group: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    labels = [""] * len(records)
    for members in by_group.values():
        keys = sorted({k for i in members for k in described[i]})
        varying = [k for k in keys if len({repr(described[i].get(k)) for i in members}) > 1]
        for i in members:
            labels[i] = ", ".join(f"{k}={described[i].get(k)}" for k in varying)
    return labels
