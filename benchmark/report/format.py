"""How the reports print numbers, and the task order and groups they lay them out in (shared by the Markdown
leaderboard, the HTML page and the comparison with the papers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks import GROUPS, TASKS

TASK_ORDER = [t.id for t in TASKS]
GROUP_OF = {t.id: t.group for t in TASKS}
GROUP_SIZES = {g: sum(t.group == g for t in TASKS) for g in GROUPS}


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
