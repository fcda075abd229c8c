"""`compare --table e2vpt|convpass|vpt|vpt-swin|vpt-mae|vpt-mocov3|e2vpt-mae|e2vpt-mocov3`: our results laid out as
a paper's tables, reported beside ours.

A table is of one backbone (`backbone` in the JSON, a reference backbone id; default `vit_b16_in21k`): its
reported lines are that backbone's rows and its lines of ours are the runs compared with that backbone
(`benchmark.papers.backbones.run_backbone`), so a Swin-B run appears under `vpt-swin` only and an MAE run under
`vpt-mae` and `e2vpt-mae` only. The other backbones' tables print group means and the mean of groups (their
sources print no per-task cells) and, for MAE and MoCo v3, the FGVC mean.

Each paper's table is data (`results/reference/paper_tables.json`): its title, its columns in the paper's
order (tasks, group means, the mean of groups, parameters), and its rows in the paper's order, each naming the
reference row it prints (`method` and a text of its `source` in `vtab1k_reported.csv`) and the suite methods
that run it (LoRA's row: `lora` and `peft_lora`, the same function). A paper that also prints an FGVC table
(VPT, E²VPT) has it under the key `fgvc`, laid out the same way from `fgvc_reported.csv` (columns: the five
datasets, `mean`, parameters) and compared with our FGVC results only; `compare --table` shows both halves. Rows of methods the suite does not have
are listed under the table, not shown. Under each reported line come our lines, one per method and protocol
variant, computed as `compare` computes them (`compare.comparison_line`: a group mean only when every task of
it has results): mean ± std over seeds, and our mean tunable parameters in millions.

Marks: † on a reported line selected on the test set (`best-test-…` protocols, as Convpass's, NOAH's); ⚠ on
our line when its protocol or backbone differs from the reported line's (`compare` says why, row by row).

Written atomically to `<results>/compare-<table>.md` and `.csv`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.core.errors import UserError
from benchmark.papers.backbones import DEFAULT_REFERENCE_BACKBONE, REFERENCE_BACKBONES, backbone_title
from benchmark.papers.reference import (
    ReferenceDataError,
    ReferenceTable,
    issues_for,
    load_references,
    source_label,
)
from benchmark.report.compare import MARK, SUITE_ROWS, comparison_line, method_variants, ours_frame
from benchmark.report.format import csv_text, markdown_table, printed
from benchmark.run.results import PROJECT_ROOT, atomic_write_bytes, load_results

PAPER_TABLES = PROJECT_ROOT / "results" / "reference" / "paper_tables.json"
TEST_SELECTED = "†"
TITLES = {"avg_groups": "avg (groups)", "avg_19": "avg (19)", "params_m": "params (M)"}
REFERENCE_NAMES = {"vtab1k": "vtab1k_reported.csv", "fgvc": "fgvc_reported.csv"}


@dataclass(frozen=True)
class TableRow:
    """One row of a paper's table: its label there, the reference row it prints, the suite methods running it."""

    label: str
    reference: str
    source: str
    methods: tuple[str, ...]
    confirmed: bool


@dataclass(frozen=True)
class PaperTable:
    """One paper's table of one suite; `halves` are its tables of the other suites (VPT's and E²VPT's FGVC)."""

    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[TableRow, ...]
    not_in_suite: tuple[str, ...]
    note: str
    suite: str = "vtab1k"
    halves: tuple[PaperTable, ...] = ()
    backbone: str = DEFAULT_REFERENCE_BACKBONE


def _table(key: str, t: dict[str, Any], suite: str, backbone: str = DEFAULT_REFERENCE_BACKBONE) -> PaperTable:
    rows = tuple(TableRow(r["label"], r["reference"], r["source"], tuple(r["methods"]), bool(r["confirmed"]))
                 for r in t["rows"])  # fmt: skip
    backbone = t.get("backbone", backbone)
    halves = tuple(_table(key, t[s], s, backbone) for s in SUITE_ROWS if s != suite and s in t)
    return PaperTable(key, t["title"], tuple(t["columns"]), rows, tuple(t.get("not_in_suite", ())),
                      t.get("note", ""), suite, halves, backbone)  # fmt: skip


def load_tables(path: Path = PAPER_TABLES) -> dict[str, PaperTable]:
    """The paper tables, checked: known columns of their suite, and every row with a method, a source and suite
    methods."""
    try:
        tables = {key: _table(key, t, "vtab1k") for key, t in json.loads(Path(path).read_text()).items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ReferenceDataError(f"{path}: cannot read the paper tables ({type(e).__name__}: {e})") from None
    for table in (part for t in tables.values() for part in (t, *t.halves)):
        unknown = [c for c in table.columns if c not in (*SUITE_ROWS[table.suite], "params_m")]
        if unknown or not table.rows:
            raise ReferenceDataError(f"{path}: table {table.key} ({table.suite}) has unknown columns {unknown} or "
                                     "no rows")  # fmt: skip
        if table.backbone not in REFERENCE_BACKBONES:
            raise ReferenceDataError(f"{path}: table {table.key} has unknown backbone {table.backbone!r}; use one of "
                                     f"{', '.join(REFERENCE_BACKBONES)}")  # fmt: skip
    return tables


def get_table(key: str, path: Path = PAPER_TABLES) -> PaperTable:
    tables = load_tables(path)
    if key not in tables:
        raise UserError(f"unknown paper table {key!r}; pick one of {', '.join(sorted(tables))}")
    return tables[key]


def _reference_row(table: PaperTable, row: TableRow, reference: ReferenceTable) -> pd.Series:
    rows = reference.rows(row.reference, table.backbone)
    found = rows[rows.source.str.contains(row.source, regex=False)]
    if len(found) != 1:
        raise ReferenceDataError(f"table {table.key}, row {row.label}: {len(found)} reference rows of "
                                 f"{row.reference} on {table.backbone} have a source containing {row.source!r}; it "
                                 "must be one")  # fmt: skip
    return found.iloc[0]


def misprints(ref: pd.Series, suite: str) -> list[str]:
    """The notes of the reference row's printed means that disagree with its cells (`misprint` known issues)."""
    return [i.note for i in issues_for(ref.method, ref.source, suite, ref.backbone) if i.kind == "misprint"]


def _ours_cell(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def table_view(results: Path, reference: ReferenceTable, table: PaperTable) -> pd.DataFrame:
    """One line per reported row and per (suite method, protocol variant) under it, in the paper's order.

    Columns: `row` (the paper's label), `side` (reported or ours), `who` (source or method), `protocol`, `mark`
    (†, ⚠ or empty), `why` (what differs, for ours), then the table's columns as numbers and, for ours,
    `<column>_std` and `<column>_n`.
    """
    results = Path(results)
    if not (results / "runs").is_dir():
        raise UserError(f"no results in {results} (expected {results / 'runs'}); run `python -m benchmark bench` "
                        "or `python -m benchmark reproduce` first, or pass the right --results")  # fmt: skip
    frame = ours_frame(load_results(results))
    if not frame.empty:
        frame = frame[(frame.suite == table.suite) & (frame.reference_backbone == table.backbone)]
    present = set(frame.method) if not frame.empty else set()
    lines: list[dict[str, Any]] = []
    for row in table.rows:
        ref = _reference_row(table, row, reference)
        tested = str(ref.selection_protocol).startswith("best-test")
        lines.append({
            "row": row.label, "side": "reported", "who": source_label(ref.source),
            "protocol": ref.selection_protocol, "mark": TEST_SELECTED if tested else "",
            "why": "; ".join([*([] if row.confirmed else ["row of this table not confirmed against the paper"]),
                              *misprints(ref, table.suite)]),
            **{c: ref[c] for c in table.columns},
        })  # fmt: skip
        for method in row.methods:
            variants = method_variants(frame, method, table.suite) if method in present else []
            if not variants:
                lines.append({"row": row.label, "side": "ours", "who": method, "protocol": "no results", "mark": "",
                              "why": "", **dict.fromkeys(table.columns, np.nan)})  # fmt: skip
            for variant in variants:
                line: dict[str, Any] = {"row": row.label, "side": "ours", "who": method,
                                        "protocol": variant.label(), "mark": ""}  # fmt: skip
                reasons = []
                for column in table.columns:
                    if column == "params_m":
                        ok = variant.runs[variant.runs.status == "ok"]
                        line[column] = ok.tunable.mean() / 1e6 if not ok.empty else np.nan
                        continue
                    c = comparison_line(variant, ref, column, reference)
                    line[column], line[f"{column}_std"], line[f"{column}_n"] = (
                        c["ours_mean"],
                        c["ours_std"],
                        c["ours_seeds"],
                    )
                    if c["protocols_match"] == "no" or c["backbone_match"] == "no":
                        reasons += [r for r in c["mismatch"].split("; ") if r and r not in reasons]
                line["mark"], line["why"] = (MARK, "; ".join(reasons)) if reasons else ("", "")
                lines.append(line)
    return pd.DataFrame(lines)


def markdown(view: pd.DataFrame, table: PaperTable, results: Path) -> str:
    """The view as a Markdown document: the paper's columns, a reported line then our lines per row."""
    body = []
    for _, line in view.iterrows():
        cells = {}
        for column in table.columns:
            value = line[column]
            if line.side == "reported":
                cells[TITLES.get(column, column)] = printed(value)
            elif column == "params_m":
                cells[TITLES.get(column, column)] = "—" if pd.isna(value) else f"{value:.2f}"
            else:
                # .get: a half where no method has results has no spread columns at all
                cells[TITLES.get(column, column)] = _ours_cell(
                    value, line.get(f"{column}_std"), line.get(f"{column}_n")
                )
        who = f"reported ({line.who})" if line.side == "reported" else f"ours: `{line.who}`"
        body.append({"method": line.row if line.side == "reported" else "", "": f"{who} {line.mark}".strip(),
                     "protocol": line.protocol, **cells, "note": line.why})  # fmt: skip
    other = table.backbone != DEFAULT_REFERENCE_BACKBONE
    lines = [
        f"# {table.title}",
        "",
        f"Ours from `{results}`, laid out as the paper's table. Generated by `python -m benchmark compare --table "
        f"{table.key}`; do not edit.",
        "",
        *(
            [
                f"Backbone: {backbone_title(table.backbone)} (`{table.backbone}`): the reported lines are its rows, ours "
                "are the runs on it; runs on other backbones are not shown.",
                "",
            ]
            if other
            else []
        ),
        f"Reported: the numbers of `results/reference/{REFERENCE_NAMES[table.suite]}` this table prints; {TEST_SELECTED} marks "
        "numbers selected on the test set (best of several test evaluations), which last-epoch numbers cannot be "
        f"compared with. Ours: mean ± std over seeds of the last-epoch test accuracy; {MARK} marks a line whose "
        "protocol or backbone differs from the reported line's (the note says how); a mean only where every task "
        "it averages has results.",
        "",
        markdown_table(body, disable_numparse=True),
        "",
        f"- {table.note}",
    ]
    if table.not_in_suite:
        lines.append(f"- Rows of the paper's table the suite has no method for: {', '.join(table.not_in_suite)}.")
    return "\n".join(lines) + "\n"


def write_table(results: Path, reference: ReferenceTable | dict[str, ReferenceTable], key: str) -> tuple[Path, str]:
    """Build the view of paper table `key` (and of its other suites' halves) for `results`, each half beside its
    own suite's reference rows (`reference`: one table, or one per suite; a suite missing takes its shipped
    file); write `compare-<key>.md` and `.csv` (a `suite` column when there are halves); return the Markdown
    path and text."""
    table = get_table(key)
    given = {reference.suite: reference} if isinstance(reference, ReferenceTable) else dict(reference)
    parts = (table, *table.halves)
    if any(part.suite not in given for part in parts):
        given = {**load_references(), **given}
    views = [table_view(results, given[part.suite], part) for part in parts]
    text = "\n".join(markdown(view, part, Path(results)) for view, part in zip(views, parts, strict=True))
    md, csv = Path(results) / f"compare-{key}.md", Path(results) / f"compare-{key}.csv"
    if table.halves:
        view = pd.concat([v.assign(suite=p.suite) for v, p in zip(views, parts, strict=True)], ignore_index=True)
        views = [view[["suite", *(c for c in view.columns if c != "suite")]]]
    atomic_write_bytes(csv, csv_text(views[0]).encode())
    atomic_write_bytes(md, text.encode())
    return md, text
