"""`reproduce`: a method's published protocol through the sweep, then compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmark.commands.options import (
    backbone_options,
    epochs,
    launcher_options,
    method_class,
    reference_options,
    run_settings,
    suite_option,
    task_list,
)
from benchmark.commands.train import sweep_and_report
from benchmark.core.errors import UserError


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses

    from benchmark.papers.protocols import plan_reproduction
    from benchmark.papers.reference import load_reference
    from benchmark.report.compare import check_sources, compare
    from benchmark.report.compare_report import comparison_files, summary_lines, write_comparison
    from benchmark.run.results import check_outputs

    reference = load_reference(args.reference, suite=args.suite)  # the suite's reported rows
    cls = method_class(args.method)
    plan = plan_reproduction(cls(), args.budget, task_list(args.tasks, args.suite), reference, epochs=args.epochs,
                             cache_features=not args.no_feature_cache)  # fmt: skip
    check_sources(reference, [cls.name], args.source)  # before hours of training, not after
    if args.plan:
        from benchmark.sweep.waves import describe_waves

        print(plan.describe())
        print(describe_waves(plan))
        return 0
    results = Path(args.results or f"results/reproduce/{cls.name}-{args.budget}").expanduser()
    check_outputs(results, comparison_files(args.suite))
    settings = dataclasses.replace(run_settings(args), budget=args.budget)
    sweep_and_report(
        args, [cls()], [tp.task for tp in plan.tasks], list(plan.seeds), results=results,
        protocol=plan.protocol.protocol, settings=settings, options=plan.options, task_overrides=plan.task_overrides(),
        recipe_overrides={"epochs": args.epochs},  # also in every task's overrides; here for the directory's settings
    )  # fmt: skip
    try:
        comparison = compare(results, reference, methods=[cls.name], sources=args.source)
    except UserError as e:
        print(f"nothing to compare: {e}", file=sys.stderr)
        return 1
    md, csv = write_comparison(comparison)
    print("\n".join([*summary_lines(comparison), f"comparison in {md} and {csv}"]))
    return 0


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "reproduce",
        help="a method's published protocol on a suite (grid on the validation split, the paper's seeds), then "
        "compare",
        description="Runs the protocol that produced a method's reported numbers through `bench`: the spec's "
        "lr x weight-decay grid on the suite's tuning splits (VTAB-1k: train800 -> val200; FGVC: train -> val; "
        "E2VPT: then its pruning search), then seeds 42,44,82,100,800 on the final splits (VTAB-1k: "
        "train800val200 -> test; FGVC: train -> test), last epoch (Convpass: its fixed recipe, no grid); then "
        "writes the leaderboard and compare.md/.csv (FGVC: compare-fgvc.md/.csv). --budget quick runs one seed and a 2x1 grid, labelled as "
        "such everywhere. --plan prints the runs without training. "
        "Example: python -m benchmark reproduce --method vpt_deep --data-root ~/vtab-1k --plan (FGVC: --suite fgvc)",
    )
    p.add_argument("--method", required=True, help="a method with reported numbers")
    p.add_argument("--budget", choices=("full", "quick"), default="full", help="default: %(default)s")
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--plan", action="store_true", help="print the runs (grid, seeds, counts, images) and stop")
    p.add_argument(
        "--epochs",
        type=epochs,
        help="train this many epochs instead of the paper's (recorded; compare marks it)",
    )
    suite_option(p)
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="the suite's data folder (default: $VTAB_ROOT or ~/.cache/peft-bench/vtab-1k for vtab1k, $FGVC_ROOT "
        "or ~/.cache/peft-bench/fgvc for fgvc)",
    )
    p.add_argument("--results", metavar="DIR", help="default: results/reproduce/<method>-<budget>")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument(
        "--rerun-stale",
        action="store_true",
        help="decide again where a decision's inputs changed (a retried grid point, a redone dense run) and rerun "
        "the results trained under an earlier decision (without it such a sweep stops, saying which)",
    )
    p.add_argument("--run-progress", action="store_true", help="also show Lightning's per-run progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    reference_options(p)
    backbone_options(p)
    launcher_options(p)
    p.set_defaults(func=cmd_reproduce)
