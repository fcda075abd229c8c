"""`leaderboard` and `compare`: tables from the result files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.commands.options import (
    method_names,
    reference_options,
    suite_option,
)
from benchmark.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


def results_dir(text: str | Path) -> Path:
    """The results directory `text` names, which must hold runs (`<results>/runs`)."""
    results = Path(text).expanduser()
    if not (results / "runs").is_dir():
        raise UserError(
            f"no results in {results} (expected {results / 'runs'}); run `python -m benchmark bench` first"
        )
    return results


def leaderboard(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """`leaderboard` of its parsed arguments: writes the files, returns each suite's board."""
    from benchmark.papers.reference import load_references
    from benchmark.report.leaderboard import write_leaderboards
    from benchmark.run.results import REPORT_FILES, check_outputs

    results = results_dir(args.results)
    check_outputs(results, REPORT_FILES)
    reference = load_references(args.reference) if args.reported or args.reference else None
    return write_leaderboards(results, reference=reference, reported=args.reported or "methods", suite=args.suite)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.report.leaderboard import markdown
    from benchmark.report.suite_board import suite_markdown

    boards = leaderboard(args)
    print("\n".join(markdown(b) if s == "vtab1k" else suite_markdown(b, s) for s, b in boards.items()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from benchmark.papers.reference import load_references
    from benchmark.report.compare import compare_suites
    from benchmark.report.compare_report import comparison_files, summary_lines, write_comparison
    from benchmark.run.results import check_outputs, check_writable
    from tasks import SUITES

    references = load_references(args.reference)
    results = Path(args.results).expanduser()
    if args.table:
        from benchmark.report.compare_table import write_table

        check_outputs(results, (f"compare-{args.table}.md", f"compare-{args.table}.csv"))
        check_writable(results)
        md, text = write_table(results, references, args.table)
        print(f"{text}\ntable in {md} and {md.with_suffix('.csv')}")
        return 0
    check_outputs(results, tuple(name for s in SUITES for name in comparison_files(s)))
    comparisons = compare_suites(results, references, methods=method_names(args.method), sources=args.source)
    check_writable(results)
    for comparison in comparisons:
        md, csv = write_comparison(comparison)
        print("\n".join([*summary_lines(comparison), f"comparison in {md} and {csv}"]))
    return 0


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "leaderboard",
        help="regenerate the tables and plot from the result JSONs",
        description="Example: python -m benchmark leaderboard --results results/bench",
    )
    p.add_argument("--results", default="results/bench", metavar="DIR")
    p.add_argument(
        "--reported",
        nargs="?",
        const="methods",
        choices=("methods", "all"),
        help="also list the papers' reported rows (kind `reported`, with their source) and overlay them on the "
        "plot as hollow markers: those of the methods in the results, or `all`",
    )
    p.add_argument(
        "--reference",
        metavar="FILE",
        help="a reference CSV replacing its suite's (default: "
        "results/reference/vtab1k_reported.csv and fgvc_reported.csv)",
    )
    suite_option(p, None, "only this suite's results (default: a table per suite with results)")
    p.set_defaults(func=cmd_leaderboard)
    p = sub.add_parser(
        "compare",
        help="our results beside the papers' numbers: compare.md and .csv (FGVC: compare-fgvc.md and .csv) in the "
        "results directory",
        description="For each method with results and each of its reported rows: per task, group and average, "
        "our mean ± std over seeds, the reported number, the difference, whether it lies within our std over "
        "seeds, and the protocol and backbone of both sides (rows where they differ are marked); each suite's "
        "results beside its own reference file (VTAB-1k: compare.md, FGVC: compare-fgvc.md). Rows are matched on "
        "backbone as well as method: a run is set beside the rows of its own backbone only (ViT-B/16 IN-21k, Swin-B "
        "IN-22k, ViT-B/16 MAE or MoCo v3; the demo's and tests' tiny ViTs stand in for ViT-B/16 IN-21k, marked), and "
        "a run on a backbone no reported row uses is compared with nothing (one line says so). "
        "Example: python -m benchmark compare --results results/reproduce/vpt_deep-full --source V-PETL",
    )
    p.add_argument("--results", default="results/bench", metavar="DIR", help="default: %(default)s")
    p.add_argument("--method", help="comma-separated methods (default: every method with results)")
    p.add_argument("--table", metavar="PAPER", help="lay ours out as a paper's tables: e2vpt and vpt (VTAB-1k and "
                   "FGVC) or convpass (VTAB-1k), on ViT-B/16 IN-21k; vpt-swin (Swin-B IN-22k, VTAB-1k group means); "
                   "vpt-mae, vpt-mocov3, e2vpt-mae, e2vpt-mocov3 (ViT-B/16 MAE or MoCo v3: VTAB-1k group means and "
                   "the FGVC mean). Each table shows only the runs on its backbone; writes compare-PAPER.md and "
                   ".csv")  # fmt: skip
    reference_options(p)
    p.set_defaults(func=cmd_compare)
