"""Which configuration a result ran under, as far as a leaderboard row is concerned.

A row of the leaderboard (and a block of `compare`) averages one method's runs under one protocol and
budget. Runs of one row must share their configuration: two sweeps with different settings written into
one results directory (say 2 and 3 epochs, on different tasks) would otherwise be averaged into one row
without a word. Everything but the fields below (backbone, weights, image size, preprocessing, precision,
recipe, the method's options) must be equal within a row; runs that differ in it are put in separate rows,
each labelled with what sets it apart.

Some fields legitimately differ from task to task, and only across tasks:

- what the method sets per task (VPT's prompt length, Convpass's scale, ...). A run whose value is the method's
  own for its task counts as `per-task`; one whose value was set by the user counts as that value. When the
  runs of one task disagree on such a field (an override for some seeds, the defaults for others), the field
  joins the row's identity for every run of the row: `num_tokens=16` and `num_tokens=per-task` are two rows.
  A run whose `per_task` switch is off has one setting for every task: its fields are then configuration;
- the earlier stages' decisions a final run trained under: the grid's selected lr and weight decay, and a
  pruning stage's candidate (with the hash of the decision, where the run records one). When the runs of one
  task disagree (seeds trained before and after a grid point or a dense run was redone), each of that task's
  runs is labelled with its decision (`svhn selected lr=0.01, weight_decay=0.0001`), so the seeds are never
  averaged into one cell: the task's cells then sit in rows of their own, and the row of the other tasks
  lacks it (the leaderboard lists such rows as incomplete).
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Settings fields that are no part of a run's identity (`runner.NOT_IDENTITY`), and the fields of the run itself.
_NOT_CONFIGURATION = {"eval_batch_size", "compile", "data_on_device", "method", "task", "seed", "protocol", "mode"}
_NOT_CONFIGURATION |= {"logger", "budget", "selection", "pruning", "decisions", "method_config"}
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


def _method_config(record: dict[str, Any]) -> dict[str, Any]:
    return _flatten(json.loads(json.dumps((record.get("config") or {}).get("method_config") or {})))


def _per_task(record: dict[str, Any]) -> bool:
    """Whether the method's per-task settings applied to the run (its config's `per_task` switch, where it has one)."""
    return ((record.get("config") or {}).get("method_config") or {}).get("per_task", True) is not False


def _skipped(record: dict[str, Any]) -> set[str]:
    return _GRID_SELECTED if record.get("protocol") == "grid" else set()


def descriptor(record: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration as far as its row goes (flattened `key -> value`): the run's settings and its
    method config, less the fields its method sets per task (unless its `per_task` switch is off) and, under
    the grid protocol, what the grid selects."""
    config = record.get("config") or {}
    out = _flatten({k: v for k, v in config.items() if k not in _NOT_CONFIGURATION})
    skip = _skipped(record) | (per_task_keys(record["method"]) if _per_task(record) else set())
    out.update({k: v for k, v in _method_config(record).items() if k not in skip})
    return out


@functools.cache
def _task_values(method: str, task: str) -> dict[str, Any] | None:
    """The method's own config for `task` (flattened), or None when it cannot be built (an unknown method)."""
    import methods

    try:
        return _flatten(json.loads(json.dumps(methods.get_method(method)().for_task(task).to_dict())))
    except (KeyError, ValueError):
        return None


def per_task_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The run's values of the fields its method sets per task: `per-task` where the value is the method's own
    for the run's task, else the value (set by the user). Empty when the run's `per_task` switch is off (those
    fields are then part of `descriptor`)."""
    if not _per_task(record):
        return {}
    own = _task_values(record["method"], record["task"])
    values = _method_config(record)
    out = {}
    for key in sorted(per_task_keys(record["method"]) - _skipped(record)):
        value = values.get(key)
        out[key] = "per-task" if own is not None and repr(own.get(key)) == repr(value) else value
    return out


def decision(record: dict[str, Any]) -> str:
    """The earlier stages' outcome the run trained under, as text ("" for none): the grid's selected lr and
    weight decay, and a pruning stage's candidate and the first 12 characters of its decision's hash."""
    config = record.get("config") or {}
    selection = record.get("selection") or config.get("selection") or {}
    pruning = record.get("pruning") or config.get("pruning") or {}
    parts = [f"{k}={selection[k]}" for k in ("lr", "weight_decay") if k in selection]
    parts += [f"candidate={pruning['candidate']}"] if pruning.get("candidate") else []
    decided = pruning.get("decision") or (config.get("decisions") or {}).get("pruning")
    parts += [f"decision={str(decided)[:12]}"] if decided else []
    return ", ".join(parts)


def _varying(values: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({repr(v.get(k)) for v in values}) > 1]


def variant_labels(records: list[dict[str, Any]], groups: list[tuple[Any, ...]]) -> list[str]:
    """For each record, what sets its configuration apart within its group ("" when its group is uniform).

    `groups[i]` is record i's row key (method, protocol, budget). Within a group, every configuration key whose
    value is not the same for all records is listed, `key=value` in key order, and so is every per-task field on
    which the records of some task disagree; then, per task, the decision of each record of a task whose
    records trained under different decisions. Runs under equal configurations get equal labels, and rows split
    exactly where the configuration (or a task's decision) does.
    """
    described = [descriptor(r) for r in records]
    per_task = [per_task_fields(r) for r in records]
    by_group: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    labels = [""] * len(records)
    for members in by_group.values():
        by_task: dict[str, list[int]] = {}
        for i in members:
            by_task.setdefault(records[i]["task"], []).append(i)
        disputed = {k for task in by_task.values() for k in _varying([per_task[i] for i in task])}
        varying = _varying([described[i] for i in members])
        for i in members:
            fields = {**{k: described[i].get(k) for k in varying}, **{k: per_task[i].get(k) for k in disputed}}
            labels[i] = ", ".join(f"{k}={fields[k]}" for k in sorted(fields))
        # A task's runs that disagree on a decision, within what is one row so far.
        cells: dict[tuple[str, str], list[int]] = {}
        for i in members:
            cells.setdefault((labels[i], records[i]["task"]), []).append(i)
        for cell in cells.values():
            if len({decision(records[i]) for i in cell}) > 1:
                for i in cell:
                    chosen = f"{records[i]['task']} selected {decision(records[i]) or 'nothing'}"
                    labels[i] = f"{labels[i]}; {chosen}" if labels[i] else chosen
    return labels
