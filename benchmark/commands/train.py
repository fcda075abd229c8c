"""`run` and `bench`: one run, and the resumable sweep (shared with `reproduce`)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.commands.options import (
    backbone_options,
    data_and_results,
    launcher_options,
    method_class,
    method_names,
    method_options,
    one_task,
    recipe_overrides,
    resolve_data_root,
    run_settings,
    seed,
    seed_list,
    task_list,
    training_options,
)
from benchmark.core.errors import UserError
from benchmark.core.paths import check_cache_dir, check_dir

if TYPE_CHECKING:
    from benchmark.run.runner import Settings
    from methods import MethodConfig
    from tasks import Task


def sweep_and_report(args: argparse.Namespace, configs: list[Any], tasks: list, seeds: list[int], *,
                     results: Path, **kwargs: Any) -> list[dict[str, Any]]:  # fmt: skip
    """`sweep.sweep` (or, with `--launcher local|slurm`, its driver) of each config in turn, with the command
    line's data, cache and progress options, then the leaderboard. Every config is checked against every task
    before the first run (`sweep.task_configs`). Returns the records of the runs executed."""
    from benchmark.report.leaderboard import write_leaderboard
    from benchmark.sweep.inline import sweep, task_configs
    from benchmark.sweep.launch import launch_options

    launch = launch_options(args)  # checked before anything is written or submitted
    check_output_paths(results, configs, launch.launcher, args.cache_dir)
    if len(configs) > 1:
        from benchmark.sweep.directory import precheck

        checked = ("protocol", "settings", "options", "recipe_overrides", "task_overrides")
        for config in configs:
            task_configs(config, tasks, **{k: v for k, v in kwargs.items() if k in checked})
        for config in configs:  # the directory's settings of every method, before the first method's runs
            precheck(results, config, rerun_stale=getattr(args, "rerun_stale", False),
                     **{k: v for k, v in kwargs.items() if k in checked[:4]})  # fmt: skip
    if launch.launcher != "inline":
        from benchmark.sweep.driver import drive

        run_sweep: Any = functools.partial(drive, launch=launch)
    else:
        if launch.threads:
            import torch

            torch.set_num_threads(launch.threads)
        run_sweep = sweep
    executed = []
    for config in configs:
        executed += run_sweep(
            config,
            tasks,
            seeds,
            data_root=resolve_data_root(args),
            results=results,
            cache_dir=args.cache_dir,
            retry_failed=args.retry_failed,
            rerun_stale=getattr(args, "rerun_stale", False),
            progress=not args.quiet,
            run_progress=args.run_progress,
            save_tunable=getattr(args, "save_tunable", False),
            **kwargs,
        )
    write_leaderboard(results)
    failed = sum(r["status"] != "ok" for r in executed)
    print(
        f"{len(executed)} run(s) executed, {failed} failed; leaderboard in {results / 'leaderboard.md'} "
        f"(in a browser: {results / 'leaderboard.html'})"
    )
    return executed


def check_output_paths(results: Path, configs: list[Any], launcher: str, cache_dir: str | None) -> None:
    """Every directory and file a sweep writes outside its runs, checked before the first run: the image cache,
    the job logs (`--launcher local|slurm`) and the leaderboard's files."""
    from benchmark.run.results import OUTPUT_FIX, REPORT_FILES, check_outputs, check_writable

    check_writable(results)  # the directory itself first: its own message says what is wrong with it
    check_cache_dir(cache_dir)
    if launcher != "inline":
        for config in configs:
            check_dir(results / "logs" / config.name, "job log directory", "--results", OUTPUT_FIX)
    check_outputs(results, REPORT_FILES)


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`bench`'s sweep of its parsed arguments, then the leaderboard; returns the records of the runs executed."""
    check_cache_dir(args.cache_dir)  # before the libraries of the sweep, which complain about a bad $HOME too
    names = method_names(args.method)
    if not names:
        raise UserError("--method needs at least one method name (`python -m benchmark methods` lists them)")
    return sweep_and_report(
        args, [method_class(n)() for n in names], task_list(args.tasks, args.suite), args.seeds, results=Path(args.results).expanduser(),
        protocol=args.protocol, settings=run_settings(args), options=method_options(args), recipe_overrides=recipe_overrides(args),
    )  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    bench(args)
    return 0


def resolve_run(args: argparse.Namespace) -> tuple[Task, Settings, MethodConfig]:
    """`run`'s task, settings and method config (resolved for the task, checked against the backbone's structure)
    from its parsed arguments."""
    check_cache_dir(args.cache_dir)  # before the imports below, whose libraries complain about a bad $HOME too
    from benchmark.run.resolve import resolve_config
    from benchmark.run.runner import check_config

    cls = method_class(args.method)
    task = one_task(args.task, several="use `bench` for several", suite=args.suite)
    if args.protocol == "grid":
        raise UserError("`run` trains once; use `bench --protocol grid` for the grid search")
    settings = run_settings(args)
    config = resolve_config(cls, task.id, method_options(args), recipe_overrides(args))
    check_config(config, settings, f" on {task.id}")
    return task, settings, config


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """`run` of its parsed arguments: the result record (also when the run failed: `status`) and its file."""
    task, settings, config = resolve_run(args)
    from benchmark.run.resolve import build_backbone
    from benchmark.run.results import check_writable, run_path, write_result
    from benchmark.run.runner import RunSpec, execute, prepare_data
    from benchmark.sweep.claims import claim_path, owner_label, read_owner, try_claim

    out = (
        Path(args.out).expanduser()
        if args.out
        else run_path(Path(args.results), config.name, task.id, args.protocol, args.seed)
    )
    if out.is_dir():
        raise UserError(f"{out} is a directory where the result file belongs; pass another --out or --results")
    if args.out:
        check_writable(out.parent, option="--out", what="output directory")
    else:
        check_writable(out.parent)
    backbone = build_backbone(config, settings)
    data = prepare_data(resolve_data_root(args), [task], args.protocol, settings,
                        args.cache_dir)  # fmt: skip
    spec = RunSpec(config, task, args.seed, args.protocol, args.protocol, settings,
                   save_state=out.with_suffix("") if args.save_tunable else None)  # fmt: skip
    claim = try_claim(out)  # the one way to run a result path: a sweep on the same directory waits for it
    if claim is None:
        owner = read_owner(claim_path(out)) or {}
        raise UserError(f"{out} is being run by {owner_label(owner)}; wait for it, or pass another --out")
    try:
        record = execute(spec, backbone, data, progress=not args.quiet, result=out)
        write_result(out, record)
    finally:
        claim.release()
    return record, out


def cmd_run(args: argparse.Namespace) -> int:
    record, out = run(args)
    acc = record["test_acc"] if args.protocol == "final" else record["val_acc"]
    if record["status"] != "ok":
        print(f"run failed: {record['error']} (recorded in {out})", file=sys.stderr)
        return 1
    split = "test" if args.protocol == "final" else record["data"]["eval_split"]["name"]  # the suite's tuning split
    print(f"{record['method']} on {record['task']} seed {args.seed}: {split} accuracy {acc:.2f}% -> {out}")
    return 0


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "run",
        help="one (method, task, seed, hyperparameters) -> one result JSON",
        description="Example: python -m benchmark run --method linear --task dtd --seed 42 "
        "--data-root ~/vtab-1k --lr 0.1",
    )
    p.add_argument("--method", required=True, help="a registered method (`python -m benchmark methods`)")
    p.add_argument("--task", required=True, help="a task id or alias (`python -m benchmark tasks`)")
    p.add_argument("--seed", type=seed, default=42)
    p.add_argument("--out", metavar="FILE", help="result path (default: the results directory's layout)")
    data_and_results(p)
    backbone_options(p)
    training_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench",
        help="the sweep: every (task, seed), resumable, then the leaderboard",
        description="Example: python -m benchmark bench --method linear --tasks dtd,eurosat "
        "--data-root ~/vtab-1k --seeds 42,44 --results results/bench (several methods: --method lora,adapter,ssf)",
    )
    p.add_argument(
        "--method", required=True,
        help="a registered method (`python -m benchmark methods`), or several, comma-separated: swept one after "
        "another with the same options, one leaderboard at the end",
    )  # fmt: skip
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--seeds", type=seed_list, default=[42, 44, 82, 100, 800], help="default: 42,44,82,100,800")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument(
        "--rerun-stale",
        action="store_true",
        help="decide again where a decision's inputs changed (a retried grid point, a redone dense run) and rerun "
        "the results trained under an earlier decision (without it such a sweep stops, saying which)",
    )
    p.add_argument("--run-progress", action="store_true", help="also show Lightning's per-run progress bar")
    data_and_results(p)
    backbone_options(p)
    training_options(p)
    launcher_options(p)
    p.set_defaults(func=cmd_bench)
