"""The leaderboard as one self-contained page, `leaderboard.html`, built from the leaderboard's own frame.

`html_page` renders the frame that `leaderboard.markdown` renders (nothing is aggregated again): the summary
and per-task tables as plain HTML tables and the accuracy-versus-parameters plot as inline SVG, so the page
reads without JavaScript. The inline script (`page.js`) only adds sorting by any column header, the text and
protocol filters, the plot's tooltips and the toggle for the papers' reported rows.

The plot is inline SVG (`benchmark.report.svg`). The page fetches nothing: styles and script are inline, and its
Content-Security-Policy forbids every request and runs no inline script or style but the page's own, named by
their SHA-256 hashes (computed as the page is written), so markup that a label smuggled into the page would
not run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.papers.reference import PROTOCOL_LABELS
from benchmark.report.format import (
    GROUP_SIZES,
    SUITE_TASKS,
    TASK_ORDER,
    average_cell,
    format_count,
    format_mean_std,
    incomplete,
    printed,
)
from benchmark.report.svg import plot_svg
from tasks import GROUPS, SUITES

HERE = Path(__file__).resolve().parent


def csp_hash(source: str) -> str:
    """A CSP source expression allowing exactly the inline `<script>` or `<style>` whose text is `source`."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def content_security_policy(script: str, style: str) -> str:
    """No request at all; only the page's own inline script and style, by hash (never `'unsafe-inline'`)."""
    return f"default-src 'none'; script-src {csp_hash(script)}; style-src {csp_hash(style)}; img-src data:"


OURS_PROTOCOLS = {
    "val-tuned": "lr and weight decay chosen on the validation split after training on the training split (the "
    "grid; VTAB-1k: train800 → val200, FGVC: train → val), then trained on the final training split "
    "(train800val200; FGVC: train); test accuracy after the last epoch",
    "fixed-hparams": "the method's recipe, no tuning, trained on the final training split (train800val200; FGVC: "
    "train); test accuracy after the last epoch",
    "val200": "trained on the training split (train800; FGVC: train); validation accuracy after the last epoch (a "
    "tuning number, not a test one)",
}


def page_meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the page's header says about the runs: backbones, dates, suite versions, memory measure."""
    backbones, versions, dates, memory = Counter(), Counter(), [], set()
    for r in records:
        config = r.get("config") or {}
        if config.get("backbone"):
            pretrained = "" if config.get("pretrained", True) else ", not pretrained"
            size = f", {config['image_size']} px" if config.get("image_size") else ""
            backbones[f"{config['backbone']}{pretrained}{size}"] += 1
        prov = r.get("provenance") or {}
        if prov:
            commit = (prov.get("git_commit") or "unknown commit")[:10] + (
                " (uncommitted changes)" * bool(prov.get("git_dirty"))
            )
            versions[f"peft-bench {(prov.get('versions') or {}).get('peft-bench') or '?'}, {commit}"] += 1
        if r.get("finished_at"):
            dates.append(r["finished_at"][:10])
        if r.get("peak_memory_kind"):
            memory.add(r["peak_memory_kind"])
    return {"runs": len(records), "backbones": backbones, "versions": versions, "dates": sorted(dates),
            "memory": sorted(memory)}  # fmt: skip


def explain_protocol(label: str) -> str:
    """One line on how a row's numbers were produced (ours: `leaderboard.protocol_label`; papers': the CSV's)."""
    if label in PROTOCOL_LABELS:
        return PROTOCOL_LABELS[label]
    m = re.fullmatch(r"(val-tuned|fixed-hparams|val200)-last-epoch-(\d+)seeds?(?: \((\w+) budget\))?", label)
    if not m:
        return "not a protocol this suite knows"
    text = f"{OURS_PROTOCOLS[m[1]]}, mean of {m[2]} seed{'s' * (m[2] != '1')}"
    return text + (f"; reduced reproduction budget `{m[3]}` (one seed, a 2 × 1 grid)" if m[3] else "")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _td(text: str, sort: float | None = None, title: str | None = None, *, cls: str | None = None) -> str:
    attrs = "" if sort is None else f' data-v="{sort:.6g}"'
    attrs += "" if cls is None else f' class="{cls}"'
    attrs += "" if title is None else f' title="{_esc(title)}"'
    return f"<td{attrs}>{_esc(text)}</td>"


def _row_attrs(key: str, r: pd.Series, reported: bool) -> str:
    """The row's key (shared with its point on the plot), kind, protocol, search text and completeness."""
    kind = r.get("kind", "ours") if reported else "ours"
    search = " ".join(str(r.get(c, "")) for c in ("method", "protocol", "source") if pd.notna(r.get(c, "")))
    return (
        f'data-key="{key}" class="{kind}" data-protocol="{_esc(r.protocol)}" data-search="{_esc(search.lower())}" '
        f'data-complete="{0 if incomplete(r) else 1}"'
    )


def _identity(r: pd.Series, reported: bool) -> list[str]:
    cells = [_td(r.kind, cls="text")] if reported else []
    cells += [_td(r.method, cls="text"), _td(r.protocol, title=explain_protocol(r.protocol), cls="text")]
    return cells + ([_td(r.source or "", title=r.get("source_full") or None, cls="text")] if reported else [])


TEXT_COLUMNS = ("kind", "method", "protocol", "source")
# Columns whose sorting keeps complete rows above incomplete ones in both directions (page.js), as the
# leaderboard orders its rows: a mean over fewer tasks is not comparable with a complete row's.
AVERAGE_COLUMNS = ("avg (groups)", "avg (tasks)", "mean")


def _table(table_id: str, headers: list[tuple[str, str]], rows: list[str]) -> str:
    """A table in a horizontally scrolling box; the text columns are left-aligned (class `text`)."""
    cls = {name: ' class="text"' for name in TEXT_COLUMNS} | {name: " data-complete-first" for name in AVERAGE_COLUMNS}
    head = "".join(f'<th scope="col"{cls.get(n, "")} title="{_esc(tip)}">{_esc(n)}</th>' for n, tip in headers)
    body = "\n".join(rows) if rows else f'<tr><td colspan="{len(headers)}">(no results)</td></tr>'
    return (
        f'<div class="scroll"><table id="{table_id}" class="board">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        f"{body}\n</tbody>\n</table></div>"
    )


def summary_table(board: pd.DataFrame) -> str:
    """Method, protocol, group means, both averages, parameters, failed runs, speed and memory where present."""
    reported = "kind" in board.columns
    speed = "images_per_s" in board.columns and board.images_per_s.notna().any()
    memory = "peak_memory_mb" in board.columns and board.peak_memory_mb.notna().any()
    headers = [("kind", "ours: this suite's runs; reported: a paper's published numbers")] if reported else []
    headers += [("method", "registered method name"), ("protocol", "how the numbers were produced (see above)")]
    headers += [("source", "where the reported row comes from")] if reported else []
    headers += [("tasks", "tasks with results, of the 19 of VTAB-1k")]
    headers += [(g, f"mean over the {g} tasks present (of {GROUP_SIZES[g]}) ± std over seeds") for g in GROUPS]
    headers += [("avg (groups)", "mean of the group means (VPT convention); rows lacking tasks of the board come "
                 "after the complete ones, the tasks they cover in brackets"),
                ("avg (tasks)", "plain mean over the tasks present (the mean of 19 when complete); rows lacking "
                 "tasks of the board come after the complete ones, the tasks they cover in brackets"),
                ("tunable", "trained parameters of the method, head excluded (reported: as the source prints it)"),
                ("nonzero", "tunable parameters that survive pruning"), ("%", "tunable / backbone parameters"),
                ("head", "parameters of the classification head"), ("failed", "runs that failed")]  # fmt: skip
    headers += [("train img/s", "training throughput, median over runs")] if speed else []
    headers += [("peak MB", "peak memory, max over runs")] if memory else []
    rows = []
    for i, r in board.iterrows():
        ours = not reported or r.kind == "ours"
        cells = _identity(r, reported)
        cells.append(_td(f"{r.tasks}/19" if ours or r.tasks else "—", r.tasks))
        text = format_mean_std if ours else lambda mean, std: printed(mean)
        for g in GROUPS:
            mean, n = r.get(f"{g}_mean"), r.get(f"{g}_tasks", 0)
            cell = text(mean, r.get(f"{g}_std"))
            partial = n not in (0, GROUP_SIZES[g]) and cell != "—"
            cells.append(_td(f"{cell} ({n}/{GROUP_SIZES[g]})" if partial else cell, _num(mean)))
        for key in ("avg_groups", "avg_tasks"):
            cell = average_cell(text(r.get(f"{key}_mean"), r.get(f"{key}_std")), r)
            cells.append(_td(cell, _num(r.get(f"{key}_mean"))))
        for key in ("tunable", "nonzero_tunable"):
            cells.append(_td(format_count(r.get(key)), _num(r.get(key))))
        pct = _num(r.get("tunable_pct"))
        cells.append(_td("—" if pct is None else f"{pct:.3f}", pct))
        cells.append(_td(format_count(r.get("head")), _num(r.get("head"))))
        cells.append(_td(str(int(r.runs_failed)), r.runs_failed) if ours else _td("—"))
        if speed:
            ips = _num(r.get("images_per_s"))
            cells.append(_td("—" if ips is None else f"{ips:,.0f}", ips))
        if memory:
            mb = _num(r.get("peak_memory_mb"))
            cells.append(_td("—" if mb is None else f"{mb:,.0f}", mb))
        rows.append(f"<tr {_row_attrs(f'r{i}', r, reported)}>{''.join(cells)}</tr>")
    return _table("summary", headers, rows)


def per_task_table(board: pd.DataFrame) -> str:
    """Mean ± std per task; a cell's title gives the number of seeds (or, for a reported row, its source)."""
    reported = "kind" in board.columns
    tasks = [t for t in TASK_ORDER if f"{t}_mean" in board.columns]
    headers = [("kind", "")] if reported else []
    headers += [("method", ""), ("protocol", "")] + ([("source", "")] if reported else [])
    headers += [(t, f"top-1 accuracy (%) on {t}, mean ± std over seeds") for t in tasks]
    rows = []
    for i, r in board.iterrows():
        cells = _identity(r, reported)
        for t in tasks:
            mean = _num(r.get(f"{t}_mean"))
            if reported and r.kind == "reported":
                cells.append(_td(printed(mean), mean, None if mean is None else f"as printed by {r.source}"))
            else:
                n = r.get(f"{t}_n")
                seeds = None if mean is None or pd.isna(n) else f"{int(n)} seed{'s' * (int(n) != 1)}"
                cells.append(_td(format_mean_std(mean, r.get(f"{t}_std")), mean, seeds))
        rows.append(f"<tr {_row_attrs(f'r{i}', r, reported)}>{''.join(cells)}</tr>")
    return _table("per-task", headers, rows)


def suite_table(board: pd.DataFrame, suite: str) -> str:
    """A suite of one group (FGVC): identity, datasets covered, mean ± std per dataset, their mean, parameters."""
    reported = "kind" in board.columns
    tasks = SUITE_TASKS[suite]
    headers = [("kind", "")] if reported else []
    headers += [("method", ""), ("protocol", "")] + ([("source", "")] if reported else [])
    headers += [("datasets", f"datasets with results, of the {len(tasks)} of {SUITES[suite].title}")]
    headers += [(t, f"top-1 accuracy (%) on {t}, mean ± std over seeds") for t in tasks]
    headers += [("mean", "plain mean over the datasets present; rows lacking datasets of the board come "
                 "after the complete ones, the datasets they cover in brackets"),
                ("tunable", "trained parameters of the method, head excluded (reported: as the source prints it)"),
                ("head", "parameters of the classification head"), ("failed", "runs that failed")]  # fmt: skip
    rows = []
    for i, r in board.iterrows():
        ours = not reported or r.kind == "ours"
        cells = _identity(r, reported)
        cells.append(_td(f"{r.tasks}/{len(tasks)}" if ours or r.tasks else "—", r.tasks))
        for key in [*tasks, "avg_tasks"]:
            mean = _num(r.get(f"{key}_mean"))
            text = format_mean_std(mean, r.get(f"{key}_std")) if ours else printed(mean)
            cells.append(_td(average_cell(text, r) if key == "avg_tasks" else text, mean))
        cells.append(_td(format_count(r.get("tunable")), _num(r.get("tunable"))))
        cells.append(_td(format_count(r.get("head")), _num(r.get("head"))))
        cells.append(_td(str(int(r.runs_failed)), r.runs_failed) if ours else _td("—"))
        rows.append(f"<tr {_row_attrs(f'r{i}-{suite}', r, reported)}>{''.join(cells)}</tr>")
    return _table(suite, headers, rows)


def suite_section(board: pd.DataFrame, suite: str) -> str:
    """The page's section for a suite other than VTAB-1k: its plot and its table."""
    title = SUITES[suite].title
    return (f'<h2 id="{suite}-board">{_esc(title)}</h2>\n<p>Top-1 accuracy (%) per dataset and the mean over them, '
            f"as the papers print it.</p>\n<h3>{_esc(title)}: accuracy versus trained parameters</h3>\n"
            f"<figure>{plot_svg(board, suite)}</figure>\n<h3>{_esc(title)}: per dataset</h3>\n"
            f"{suite_table(board, suite)}")  # fmt: skip


def _header(board: pd.DataFrame, meta: dict[str, Any], total: int = 19) -> str:
    ours = board[board.kind == "ours"] if "kind" in board.columns else board
    present = [t for t in TASK_ORDER if f"{t}_mean" in ours.columns and ours[f"{t}_mean"].notna().any()]
    dates = meta["dates"]
    when = "—" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"

    def listing(counts: Counter) -> str:
        if len(counts) <= 1:
            return _esc(next(iter(counts), "—"))
        return "; ".join(f"{_esc(k)} ({n} runs)" for k, n in counts.most_common())

    facts = [
        ("backbone", listing(meta["backbones"])),
        ("tasks present", f"{len(present)}/{total}" + (f": {_esc(', '.join(present))}" if present else "")),
        ("runs", f"{meta['runs']}, finished {_esc(when)}"),
        ("suite", listing(meta["versions"])),
    ]
    if meta["memory"]:
        facts.append(("peak MB measures", _esc(", ".join(meta["memory"]))))
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    protocols = "".join(
        f"<li><code>{_esc(p)}</code>: {_esc(explain_protocol(p))}</li>"
        for p in dict.fromkeys(board.get("protocol", []))
    )
    return f'<dl class="facts">{items}</dl>\n<p>Protocols:</p>\n<ul class="protocols">{protocols}</ul>'


def html_page(boards: pd.DataFrame | dict[str, pd.DataFrame], meta: dict[str, Any]) -> str:
    """The whole page: header, controls (shown by the script), then per suite (a board, or one per suite id):
    VTAB-1k's plot, summary and per-task tables, another suite's section; the sources of reported rows."""
    boards = {"vtab1k": boards} if isinstance(boards, pd.DataFrame) else boards
    board = pd.concat(list(boards.values()), ignore_index=True) if len(boards) > 1 else next(iter(boards.values()))
    reported = "kind" in board.columns and (board.kind == "reported").any()
    protocols = list(dict.fromkeys(board.get("protocol", [])))
    options = "".join(f'<option value="{_esc(p)}">{_esc(p)}</option>' for p in protocols)
    toggle = ('<label><input type="checkbox" id="show-reported" checked> show the papers\' reported rows</label>'
              if reported else "")  # fmt: skip
    sources = ""
    if reported:
        rows = board[board.kind == "reported"].drop_duplicates("source_full")
        items = "".join(f"<li><b>{_esc(r.source)}</b>: {_esc(r.source_full)}</li>" for _, r in rows.iterrows())
        sources = f"<h2>Sources of the reported rows</h2>\n<ul>{items}</ul>"
    names = " and ".join(SUITES[s].title for s in boards)
    files = ", ".join(f"<code>results/reference/{s}_reported.csv</code>" for s in boards)
    note = (
        f"<p>Rows of kind <code>reported</code> are published numbers (ViT-B/16 on the real {names}, "
        f"{files}): context, not a result of these runs.</p>"
        if reported
        else ""
    )
    vtab = boards.get("vtab1k")
    main = (
        ""
        if vtab is None
        else f"""<h2>Accuracy versus trained parameters</h2>
<figure>{plot_svg(vtab)}<div id="tooltip" role="tooltip" hidden></div></figure>
<h2>Summary</h2>
<p class="hint">Click a column header to sort by it; click again to reverse.</p>
{summary_table(vtab)}
<h2>Per task</h2>
{per_task_table(vtab)}
"""
    )
    main += "\n".join(suite_section(b, s) for s, b in boards.items() if s != "vtab1k")
    if vtab is None:
        main += '\n<div id="tooltip" role="tooltip" hidden></div>'  # the script's tooltip box
    total = sum(len(SUITE_TASKS[s]) for s in boards)
    # The exact text between the tags: the CSP's hashes must cover it byte for byte.
    style, script = "\n" + (HERE / "page.css").read_text(), "\n" + (HERE / "page.js").read_text()
    csp = content_security_policy(script, style)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>peft-bench leaderboard</title>
<style>{style}</style>
</head>
<body>
<h1>peft-bench leaderboard</h1>
{_header(board, meta, total)}
<p>Top-1 accuracy (%) as mean ± std over seeds; hover a per-task cell for its number of seeds. Generated by
<code>python -m benchmark leaderboard</code> from the result files beside this page; do not edit.</p>
{note}
<div id="controls" class="controls" hidden>
<label>filter <input type="search" id="filter" placeholder="method, protocol or source"></label>
<label>protocol <select id="protocol-filter"><option value="">all</option>{options}</select></label>
{toggle}
<span id="shown"></span>
</div>
{main}{sources}
<script>{script}</script>
</body>
</html>
"""
