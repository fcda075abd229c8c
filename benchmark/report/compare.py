"""`compare`: our results beside the papers' numbers, row by row, with the protocol of each side.

For every method with results (or the ones asked for) and every reference row of that method
(`benchmark/papers/reference.py`, optionally narrowed by source), one line per task, per group mean
(natural, specialized, structured), for the mean of groups and for the mean of 19:

- ours: mean ± std over seeds of the last-epoch test accuracy, aggregated exactly as the leaderboard
  does (`leaderboard.aggregate`: a group mean's std is the std over seeds of the per-seed group means);
  a group mean or average is given only when every task it covers has results;
- reported: the reference value; diff = ours − reported, in points;
- within spread: `yes` when |diff| ≤ our sample std over seeds (n − 1 in the denominator), `no` when
  larger, `n/a` with fewer than two seeds or without one of the sides;
- the protocol of each side: ours in the reference table's vocabulary (`leaderboard.protocol_label`,
  e.g. `val-tuned-last-epoch-5seeds` from `--protocol grid` or `reproduce`,
  `fixed-hparams-last-epoch-2seeds` from `--protocol final`, suffixed by a reduced budget), theirs as
  labelled in the reference CSV. `protocols_match` is `yes` only when the labels are equal, the budget is
  complete and ours trained the reported rows' 100 epochs; `backbone_match` only when ours ran the
  row's checkpoint at 224 px. Every other row is marked (⚠ in the Markdown) and `mismatch`
  says why: such a difference is not a like-for-like result.

Rows are matched on backbone as well as method (`benchmark.papers.backbones`): a run is set beside the rows of the
reference backbone its recorded `config.backbone` maps to (a Swin-B run beside the Swin-B rows only, an MAE run
beside the MAE rows), never beside another backbone's. A run whose backbone no reference row uses is compared with
nothing, and the output says so in one line.

`benchmark/report/compare_report.py` writes it out: `<results>/compare.csv` (every line, full precision) and
`<results>/compare.md` (reference rows that print identical numbers under the same protocol share one table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.core.errors import UserError
from benchmark.papers.backbones import DEFAULT_REFERENCE_BACKBONE, REFERENCE_BACKBONES, backbone_title
from benchmark.papers.backbones import backbone_identity as backbone_identity  # re-exported: compare's interface
from benchmark.papers.reference import (
    MEAN_COLUMNS,
    REPORTED_EPOCHS,
    ReferenceTable,
    issues_for,
    source_label,
)
from benchmark.report.format import GROUP_OF, GROUP_SIZES, SUITE_TASKS, TASK_ORDER, protocol_label
from benchmark.report.ours import Variant, method_variants, ours_frame
from benchmark.run.results import load_results
from tasks import SUITES

# A suite's lines: its tasks, then its means (VTAB-1k: groups, mean of groups, mean of 19; FGVC: the mean of five).
SUITE_ROWS: dict[str, tuple[str, ...]] = {
    "vtab1k": (*SUITE_TASKS["vtab1k"], *MEAN_COLUMNS),
    "fgvc": (*SUITE_TASKS["fgvc"], "mean"),
}
ROWS: tuple[str, ...] = SUITE_ROWS["vtab1k"]
ROW_TITLES = {"avg_groups": "avg (groups)", "avg_19": "avg (19 tasks)", "mean": "mean (5 datasets)"}
# The lines a suite's summary shows, with their short titles.
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "vtab1k": (("avg_groups", "avg(g)"), ("avg_19", "avg(19)")),
    "fgvc": (("mean", "mean"),),
}
CSV_COLUMNS = [
    "method", "ours_protocol", "ours_budget", "source", "reported_protocol", "row", "kind", "ours_mean",
    "ours_std", "ours_seeds", "reported", "diff", "within_spread", "protocols_match", "ours_backbone",
    "reported_backbone", "backbone_match", "reported_confirmed", "mismatch", "note", "source_full",
]  # fmt: skip
MARK = "⚠"


def _row_tasks(row: str, suite: str) -> list[str]:
    """The tasks a line averages: the task itself, a group's tasks, or all the suite's."""
    if row in GROUP_SIZES:
        return [t for t in TASK_ORDER if GROUP_OF[t] == row]
    return list(SUITE_TASKS[suite]) if row in ("avg_groups", "avg_19", "mean") else [row]


def _kind(row: str) -> str:
    return "task" if row in TASK_ORDER else "group" if row in GROUP_SIZES else "average"


def _ours_row(variant: Variant, row: str) -> dict[str, Any]:
    """Our side of one line: mean, std, seeds, label, backbone and epochs of the runs it covers, and notes."""
    s = variant.stats
    tasks = _row_tasks(row, variant.suite)
    notes = []
    if row in TASK_ORDER:
        key = row
        present = f"{row}_mean" in s
    else:
        key = "avg_tasks" if row in ("avg_19", "mean") else row
        covered = sum(f"{t}_mean" in s for t in tasks)
        present = covered == len(tasks)
        if not present:
            notes.append(f"ours covers {covered}/{len(tasks)} of its tasks, so no mean is compared")
    runs = variant.runs[variant.runs.task.isin(tasks) & (variant.runs.status == "ok")]
    weights = set(runs.weights_id.fillna("-")) if not runs.empty else set()
    out: dict[str, Any] = {
        "ours_mean": s[f"{key}_mean"] if present else np.nan,
        "ours_std": s[f"{key}_std"] if present else np.nan,
        "ours_seeds": s[f"{key}_n"] if present else 0,
        "weights_id": weights.pop() if len(weights) == 1 else None,
        "ours_backbone": "; ".join(sorted(set(runs.backbone_text))) if not runs.empty else "—",
        "epochs": sorted({int(e) for e in runs.epochs.dropna()}),
    }
    if out["weights_id"] == "-":
        out["weights_id"] = None
    if present:
        out["ours_protocol"] = protocol_label(variant.protocol, int(out["ours_seeds"]), variant.budget)
    else:
        out["ours_protocol"] = "no result" if row in TASK_ORDER else "incomplete"
        if row in TASK_ORDER:
            failed = (variant.runs.task == row).sum()
            notes.append("every run of ours failed" if failed else "no result of ours")
    out["notes"] = notes
    return out


def comparison_line(variant: Variant, ref: pd.Series, row: str, reference: ReferenceTable) -> dict[str, Any]:
    ours = _ours_row(variant, row)
    reported = ref[row]
    diff = ours["ours_mean"] - reported if pd.notna(ours["ours_mean"]) and pd.notna(reported) else np.nan
    if pd.notna(diff) and ours["ours_seeds"] >= 2:
        within = "yes" if abs(diff) <= ours["ours_std"] else "no"
    else:
        within = "n/a"
    notes = list(ours["notes"])
    have = pd.notna(ours["ours_mean"])
    # Whether the two sides were produced the same way (only meaningful where we have a number).
    base_label = protocol_label(variant.protocol, int(ours["ours_seeds"])) if have else None
    reasons = []
    if have:
        if base_label != ref.selection_protocol:
            reasons.append(f"protocol {base_label} vs {ref.selection_protocol}")
        if variant.budget != "full":
            reasons.append(f"{variant.budget} budget")
        if ours["epochs"] != [REPORTED_EPOCHS]:
            reasons.append(f"{'/'.join(map(str, ours['epochs'])) or '?'} epochs vs {REPORTED_EPOCHS}")
        match = "no" if reasons else "yes"
        backbone_match = "yes" if ours["weights_id"] == ref.backbone_weights else "no"
        if backbone_match == "no":
            reasons.append(f"backbone {ours['ours_backbone']} vs {ref.backbone_weights}")
    else:
        match = backbone_match = "n/a"
    if pd.isna(reported):
        notes.append("not printed by the source")
    for d in reference.discrepancies:
        if d.line == ref.line and d.column == row:
            notes.append(f"printed {d.value}; its cells give {d.rounded} (see the end)")
    for issue in issues_for(ref.method, ref.source, reference.suite, ref.backbone):
        if row in issue.columns and issue.kind == "unconfirmed":
            notes.append("unconfirmed reported value")
        elif row in issue.columns and issue.kind != "published-means":
            notes.append(issue.note)
    return {
        "method": variant.method,
        "ours_protocol": ours["ours_protocol"],
        "ours_budget": variant.budget,
        "source": source_label(ref.source),
        "reported_protocol": ref.selection_protocol,
        "row": row,
        "kind": _kind(row),
        "ours_mean": ours["ours_mean"],
        "ours_std": ours["ours_std"],
        "ours_seeds": ours["ours_seeds"],
        "reported": reported,
        "diff": diff,
        "within_spread": within,
        "protocols_match": match,
        "ours_backbone": ours["ours_backbone"],
        "reported_backbone": ref.backbone_weights,
        "backbone_match": backbone_match,
        "reported_confirmed": ref.confirmed,
        "mismatch": "; ".join(reasons),
        "note": "; ".join(notes),
        "source_full": ref.source,
    }


@dataclass
class Block:
    """Our runs of one method under one protocol and budget beside one reference row: a line per `ROWS` entry."""

    variant: Variant
    reference: pd.Series
    lines: pd.DataFrame

    def marked(self) -> bool:
        return bool(self.lines.apply(is_marked, axis=1).any())


@dataclass
class Comparison:
    """What `compare` found.

    Attributes:
        blocks: one per (our variant, reference row), in method order.
        variants: every variant of our runs of the compared methods (also those without reference rows).
        unreported: compared methods that have no reference rows on the backbones of their runs.
        reference: the reference table.
        results: the results directory.
        unmatched: variants whose backbone no reference row uses: compared with nothing.
    """

    blocks: list[Block]
    variants: list[Variant]
    unreported: list[str]
    reference: ReferenceTable
    results: Path
    unmatched: list[Variant] = field(default_factory=list)

    @property
    def lines(self) -> pd.DataFrame:
        """Every line of every block, in the CSV's columns."""
        if not self.blocks:
            return pd.DataFrame(columns=CSV_COLUMNS)
        return pd.concat([b.lines for b in self.blocks], ignore_index=True)


def _selected(source: str, sources: list[str] | None) -> bool:
    return not sources or any(s.lower() in source.lower() for s in sources)


def check_sources(reference: ReferenceTable, methods: list[str], sources: list[str] | None) -> None:
    """Raise `UserError` when `sources` are given and select none of the methods' reference rows."""
    if not sources:
        return
    rows = reference.frame[reference.frame.method.isin(methods)]
    if not rows.source.map(lambda s: _selected(s, sources)).any():
        known = sorted({source_label(s) for s in rows.source})
        raise UserError(f"no reference row of {', '.join(methods)} has a source containing "
                        f"{' or '.join(map(repr, sources))}; their sources: {', '.join(known) or 'none'}")  # fmt: skip


def _ours(results: Path) -> pd.DataFrame:
    """`ours_frame` of the results directory; `UserError` when it has no test-split results."""
    results = Path(results)
    if not (results / "runs").is_dir():
        raise UserError(f"no results in {results} (expected {results / 'runs'}); run `python -m benchmark bench` "
                        "or `python -m benchmark reproduce` first, or pass the right --results")  # fmt: skip
    frame = ours_frame(load_results(results))
    if frame.empty:
        raise UserError(f"no test-split results in {results} (only tuning runs, or none); run `python -m benchmark "
                        "bench` (protocol final or grid) or `python -m benchmark reproduce` first")  # fmt: skip
    return frame


def _check_methods(frame: pd.DataFrame, methods: list[str], results: Path, where: str = "") -> None:
    present = sorted(frame.method.unique())
    for method in methods:
        if method not in present:
            raise UserError(f"no results for {method}{where} in {results} (it has results for {', '.join(present)}); "
                            "pick one of those with --method")  # fmt: skip


def comparison_of(
    frame: pd.DataFrame, reference: ReferenceTable, methods: list[str], sources: list[str] | None, results: Path
) -> Comparison:
    """The comparison of `methods`' runs on the reference's suite (`frame`: `ours_frame`) with its rows."""
    blocks, variants, unreported, unmatched = [], [], [], []
    rows = SUITE_ROWS[reference.suite]
    for method in methods:
        found = method_variants(frame, method, reference.suite)
        matched = {v.backbone for v in found if v.backbone} if found else {DEFAULT_REFERENCE_BACKBONE}
        if matched and not any(len(reference.rows(method, b)) for b in matched):
            unreported.append(method)
        for variant in found:
            variants.append(variant)
            if not variant.backbone:
                unmatched.append(variant)
                continue
            refs = reference.rows(method, variant.backbone)
            for _, ref in refs[refs.source.map(lambda s: _selected(s, sources))].iterrows():
                lines = pd.DataFrame(
                    [comparison_line(variant, ref, row, reference) for row in rows], columns=CSV_COLUMNS
                )
                blocks.append(Block(variant, ref, lines))
    return Comparison(blocks, variants, unreported, reference, Path(results), unmatched)


def unmatched_line(variant: Variant) -> str:
    """The one line that says a variant is compared with nothing: no reference row uses its backbone."""
    ran = "; ".join(sorted(set(variant.runs.backbone_text))) or "?"
    known = ", ".join(backbone_title(b) for b in REFERENCE_BACKBONES)
    return (f"{variant.method} [{variant.label()}] ran on {ran}, a backbone no reported row uses ({known}): "
            "compared with nothing")  # fmt: skip


def compare(
    results: Path, reference: ReferenceTable, *, methods: list[str] | None = None, sources: list[str] | None = None
) -> Comparison:
    """Build the comparison of the results under `results` on the reference's suite with `reference`.

    Args:
        results: a results directory (`<results>/runs/...`, as `bench` and `reproduce` write it).
        reference: the checked reference table of one suite; only results on that suite's tasks are compared.
        methods: only these methods (default: every method with test-split results on the suite).
        sources: keep only reference rows whose source contains one of these texts (case-insensitive).

    Raises:
        UserError: no results, a method without results, or sources that select no row.
    """
    frame = _ours(results)
    title = SUITES[reference.suite].title
    frame = frame[frame.suite == reference.suite]
    if frame.empty:
        raise UserError(f"no test-split results on {title} tasks in {results}; compare reads the results of the "
                        "reference file's suite")  # fmt: skip
    methods = sorted(frame.method.unique()) if methods is None else methods
    _check_methods(frame, methods, results, f" on {title}")
    check_sources(reference, methods, sources)
    return comparison_of(frame, reference, methods, sources, results)


def compare_suites(
    results: Path,
    references: dict[str, ReferenceTable],
    *,
    methods: list[str] | None = None,
    sources: list[str] | None = None,
) -> list[Comparison]:
    """A comparison per suite with results (in `SUITES` order), each with its own suite's reference rows.

    Raises:
        UserError: no results, a method without results on any suite, or sources that select no row of any.
    """
    frame = _ours(results)
    _check_methods(frame, methods or [], results)
    suites = [s for s in SUITES if (frame.suite == s).any() and s in references]
    chosen = {s: [m for m in (methods or sorted(frame[frame.suite == s].method.unique()))
                  if (frame[frame.suite == s].method == m).any()] for s in suites}  # fmt: skip
    if sources and not any(
        references[s]
        .frame[references[s].frame.method.isin(chosen[s])]
        .source.map(lambda x: _selected(x, sources))
        .any()
        for s in suites
    ):
        check_sources(references[suites[0]], chosen[suites[0]], sources)  # raises, naming the known sources
    return [comparison_of(frame[frame.suite == s], references[s], chosen[s], sources, results) for s in suites
            if chosen[s]]  # fmt: skip


def is_marked(line: pd.Series) -> bool:
    return line.protocols_match == "no" or line.backbone_match == "no"
