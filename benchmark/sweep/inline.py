"""The resumable sweep: one method over tasks and seeds, as a graph of runs.

Per task: the grid search (protocol `grid`: every lr x weight-decay pair in `tune` mode with the tuning
seed, the best last-epoch accuracy on the suite's validation split wins), the pruning stage of methods that prune, then one final
run per seed. Every run's result is one file; a run whose file exists is not run again, so a killed sweep
resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.core.errors import UserError
from benchmark.run.resolve import Backbones, resolve_config
from benchmark.run.results import check_result_path, check_writable
from benchmark.run.runner import (
    PROTOCOLS,
    Settings,
    check_config,
    prepare_data,
    quiet_lightning,
)
from benchmark.sweep.claims import clean_orphans
from benchmark.sweep.directory import check_directory
from benchmark.sweep.graph import Plan, Sweep
from benchmark.sweep.resume import conflict
from methods import MethodConfig
from tasks import Task


def task_configs(
    config: MethodConfig,
    tasks: list[Task],
    *,
    protocol: str,
    settings: Settings,
    options: dict[str, str] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    task_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, MethodConfig]:
    """Each task's config of the sweep (`prepare_sweep`'s arguments; `resolve.resolve_config` from `config`),
    checked against the backbone's structure; anything wrong is a `UserError`. Nothing is loaded: a command
    sweeping several methods checks them all before the first run."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; pick one of {', '.join(PROTOCOLS)}")
    configs = {}
    for task in tasks:
        task_recipe = (task_overrides or {}).get(task.id)
        configs[task.id] = resolve_config(config, task.id, options, recipe_overrides, task_recipe)
        r = configs[task.id].recipe
        if protocol == "grid" and (not r.lr_grid or not r.wd_grid):
            raise UserError(f"{config.name} has no lr/weight-decay grid; pass --lr-grid and --wd-grid")
    for task in tasks:  # options the backbone cannot take (e.g. segments that do not divide its width)
        check_config(configs[task.id], settings, f" on {task.id}")
    return configs


def prepare_sweep(
    config: MethodConfig,
    tasks: list[Task],
    seeds: list[int],
    *,
    protocol: str,
    settings: Settings,
    data_root: Path,
    results: Path,
    options: dict[str, str] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    task_overrides: dict[str, dict[str, Any]] | None = None,
    cache_dir: Path | None = None,
    retry_failed: bool = False,
    rerun_stale: bool = False,
    run_progress: bool = False,
    save_tunable: bool = False,
    sweep_cls: type[Sweep] = Sweep,
) -> tuple[Sweep, dict[str, MethodConfig], list[tuple[Plan, bool]]]:
    """Everything a sweep checks and loads before its first run: per-task configs, backbone, data, conflicts.

    Returns the sweep's state (a `sweep_cls`), each task's config, and the runs whose identity is known
    before any training, each with whether it is deferred (see `resume.identity`). Nothing is written but the
    directory's settings file, once every check has passed (`directory.check_directory`: a sweep of other settings
    stops here); leftovers of killed runs (orphan temporary files, stale claims) are removed.
    """
    configs = task_configs(config, tasks, protocol=protocol, settings=settings, options=options,
                           recipe_overrides=recipe_overrides, task_overrides=task_overrides)  # fmt: skip
    # A pruning stage decides in tune mode (VTAB-1k: train800 -> val200) whatever the protocol.
    pruning = any(c.prunes for c in configs.values())
    check_writable(results)
    # The weights are checked (key for key) before the images are decoded, which is the longer wait.
    backbones = Backbones(settings)
    for cfg in configs.values():  # every task's backbone (one per distinct arguments), from its resolved config
        backbones(cfg)
    data = prepare_data(data_root, tasks, "grid" if pruning else protocol, settings, cache_dir)
    state = sweep_cls(config, protocol=protocol, settings=settings, results=results, backbones=backbones, data=data,
                      retry_failed=retry_failed, run_progress=run_progress, save_tunable=save_tunable,
                      rerun_stale=rerun_stale)  # fmt: skip
    # Checked up front for the runs whose identity is known before any training.
    known: list[tuple[Plan, bool]] = []
    for task in tasks:
        cfg = configs[task.id]
        if protocol == "grid":
            # Grid points that carry a decision made from the pretrained model are known only once it is made.
            early = cfg.prunes and not cfg.trains_dense
            known += [(p, early) for p in state.grid_plans(cfg, task)]
        elif cfg.trains_dense:
            known.append((state.dense_plan(cfg, task, None), False))
        known += [(p, True) for p in state.final_plans(cfg, task, seeds)]
    for p, _ in known:
        check_result_path(p.path, results)
    conflicts = [c for p, deferred in known
                 if (c := conflict(p.path, p.spec, data, deferred=deferred, rerun_stale=rerun_stale))]  # fmt: skip
    if conflicts:
        raise UserError(f"{conflicts[0]}; use another --results directory or delete the old results")
    check_directory(results, config, protocol=protocol, settings=settings, data=data, options=options,
                    recipe_overrides=recipe_overrides, rerun_stale=rerun_stale)  # fmt: skip
    for path in clean_orphans(results / "runs" / config.name):
        tqdm.write(f"removed {path}, left by a run that was killed", file=sys.stderr)
    return state, configs, known


def sweep(
    config: MethodConfig,
    tasks: list[Task],
    seeds: list[int],
    *,
    progress: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Run every (task, seed) of `config` under `protocol`, skipping runs whose result already exists.

    Per task: the grid search (protocol `grid`), the pruning stage (methods that prune: a dense run on
    the tuning split, the method's candidates, a rewind run of each scored on the validation split), then one
    final run per seed (the splits are the task's suite's: `benchmark.run.splits`). Everything that can be wrong with the input (data, backbone, results directory, a result file
    from a different configuration) is checked before the first run, and nothing is written before then.
    `task_overrides` adds recipe overrides per task id on top of `recipe_overrides` (e.g. a grid in
    learning rates scaled by each task's batch size). `save_tunable` saves each final run's trained tunable
    state (plus head) beside its result (`<protocol>-s<seed>.safetensors`, for `export`). The keyword
    arguments are `prepare_sweep`'s.
    Returns the records of the runs this call executed.
    """
    state, configs, known = prepare_sweep(config, tasks, seeds, **kwargs)
    if not state.run_progress:
        quiet_lightning()
    todo = sum(state.needs_run(p.path) for p, _ in known)
    todo += sum(configs[t.id].trains_dense and state.protocol == "grid" for t in tasks)  # the dense runs after a grid
    state.bar = tqdm(total=todo, desc=config.name, unit="run", disable=not progress)
    try:
        for task in tasks:
            state.task(configs[task.id], task, seeds)
    finally:
        state.bar.close()
    return state.executed
