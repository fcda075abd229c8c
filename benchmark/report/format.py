"""How the reports print numbers, and the task order and groups they lay them out in (shared by the Markdown
leaderboard, the HTML page and the comparison with the papers).

`TASK_ORDER`, `GROUP_OF` and `GROUP_SIZES` cover every suite's tasks (VTAB-1k's 19 first, then FGVC's five);
a report lays out one suite at a time (`SUITE_TASKS`, `SUITE_OF`), never averaging tasks of two suites."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks import SUITES, list_tasks

SUITE_TASKS: dict[str, list[str]] = {s: [t.id for t in list_tasks(suite=s)] for s in SUITES}
TASK_ORDER = [t for tasks in SUITE_TASKS.values() for t in tasks]
GROUP_OF = {t.id: t.group for t in list_tasks()}
SUITE_OF = {t.id: t.suite for t in list_tasks()}
GROUP_SIZES = {g: sum(t.group == g for t in list_tasks()) for s in SUITES.values() for g in s.groups}


def suites_of(tasks: Any) -> list[str]:
    """The suites the given task ids belong to, in `SUITES` order (unknown ids belong to none)."""
    present = {SUITE_OF[t] for t in tasks if t in SUITE_OF}
    return [s for s in SUITES if s in present]


def format_mean_std(mean: Any, std: Any) -> str:
    """`71.2 ± 0.3`; the mean alone where there is no std (a single seed), `—` where there is no mean."""
    if mean is None or pd.isna(mean):
        return "—"
    return f"{mean:.1f}" if std is None or pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def incomplete(row: pd.Series) -> bool:
    """Whether a leaderboard row lacks results on some task of its board (`leaderboard_frame`'s `complete`)."""
    complete = row.get("complete", True)
    return not (pd.isna(complete) or bool(complete))


def average_cell(text: str, row: pd.Series) -> str:
    """An average's cell: `text`, followed by `(covered/board tasks)` when the row is incomplete, since its
    mean then covers fewer tasks than the complete rows' means."""
    if text == "—" or not incomplete(row):
        return text
    return f"{text} ({int(row.tasks)}/{int(row.board_tasks)})"


def printed(value: Any) -> str:
    """A reported number as its source printed it (one or two decimals; the table stores floats)."""
    if value is None or pd.isna(value):
        return "—"
    text = f"{value:.2f}"
    return text[:-1] if text.endswith("0") else text


def format_count(n: Any) -> str:
    if n is None or pd.isna(n):
        return "—"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{round(n):,}"


def count_cells(r: pd.Series, ours: bool) -> dict[str, Any]:
    """A board row's parameter and failure cells: tunable, nonzero, % of the backbone, head, failed runs."""
    return {
        "tunable": format_count(r.get("tunable")),
        "nonzero": format_count(r.get("nonzero_tunable")),
        "%": "—" if pd.isna(r.get("tunable_pct", np.nan)) else f"{r.tunable_pct:.3f}",
        "head": format_count(r.get("head")),
        "failed": int(r.runs_failed) if ours else "—",
    }


def sources_section(board: pd.DataFrame) -> list[str]:
    """The Markdown lines naming the full source of each reported row on a board (none without such rows)."""
    if "kind" not in board.columns or not (board.kind == "reported").any():
        return []
    sources = board[board.kind == "reported"].drop_duplicates("source_full")
    other = sources.source.str.contains(r" \[[^\[]*\)\]$", regex=True).any()
    note = ["A source followed by a backbone in brackets was reported on that backbone, not on ViT-B/16 (IN-21k); "
            "it is listed beside the methods whose runs are compared with that backbone's rows.", ""]  # fmt: skip
    return [
        "## Sources of the reported rows",
        "",
        *(note if other else []),
        *(f"- **{r.source}**: {r.source_full}" for _, r in sources.iterrows()),
        "",
    ]


def trained_params(row: pd.Series) -> float:
    """A row's x on the accuracy-versus-parameters plots: tunable parameters plus the head (when counted)."""
    head = row.get("head", np.nan)
    return float(row.tunable + (head if pd.notna(head) else 0.0))


def protocol_label(protocol: str, n_seeds: int, budget: str = "full") -> str:
    """How a row's numbers were produced, in the vocabulary of the reference table.

    A reduced reproduction budget (`reproduce --budget quick`) is part of the label, so a quick run
    never reads like the complete protocol.
    """
    seeds = f"{n_seeds}seed" + ("s" if n_seeds != 1 else "")
    label = {
        "grid": f"val-tuned-last-epoch-{seeds}",
        "final": f"fixed-hparams-last-epoch-{seeds}",
        "tune": f"val200-last-epoch-{seeds}",
    }[protocol]
    return label if budget == "full" else f"{label} ({budget} budget)"


def markdown_text(value: Any) -> str:
    """A cell's text made safe for a Markdown table: a `|` would end the cell, a line break the row.

    The backslash is escaped first so that a label's own `\\` cannot turn the escaped `\\|` back into a cell
    separator (GFM splits cells at every pipe that no backslash escapes).
    """
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.splitlines())


def markdown_table(rows: list[dict[str, Any]], **options: Any) -> str:
    """`rows` as a Markdown table (pandas' `to_markdown`, which writes cells as they are), every text escaped."""
    safe = [{markdown_text(k): markdown_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    return pd.DataFrame(safe).to_markdown(index=False, **options)


# Leading characters that make a spreadsheet read a CSV cell as a formula (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(frame: pd.DataFrame) -> str:
    """`frame` as CSV (floats to 4 decimals), its text cells that a spreadsheet would run as a formula prefixed
    with `'` as OWASP recommends; numbers, negative ones included, stay numbers. Every text stays in its cell."""

    def safe(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        # pandas' writer quotes a cell holding a line feed but not one holding a bare carriage return, which
        # would end the row: such a return is written as a line feed.
        text = value.replace("\r\n", "\n").replace("\r", "\n")
        return "'" + text if value.startswith(FORMULA_START) else text

    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):  # numbers are written as numbers, never prefixed
            out[column] = out[column].map(safe)
    out.columns = [safe(str(c)) for c in out.columns]
    return out.to_csv(index=False, float_format="%.4f")
