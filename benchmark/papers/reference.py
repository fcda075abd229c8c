"""The papers' VTAB-1k numbers (`results/reference/vtab1k_reported.csv`), loaded and checked.

One row per (method, source): the 19 task accuracies as printed, the three group means, the mean of
groups (`avg_groups`) and the mean of 19 (`avg_19`), the protocol that produced them
(`selection_protocol`), the backbone weights, the printed parameter count and how much of the row was
confirmed against its source. `results/reference/README.md` describes the file.

Every load checks the whole file and refuses it with one line (file, line, column, what is wrong) when:
a column is missing, unknown or repeated; a row has the wrong number of fields; a number is not a plain
decimal or lies outside 0–100; a label is not one of the known ones; a (method, source) pair repeats; or
a mean is further from the mean recomputed from the cells than rounding allows.

Rounding tolerance: a cell printed with k decimals stands for a value within half a unit of its last
decimal (0.05 for k = 1), so the mean of such cells is within that much of the mean of the true values;
the printed mean adds half a unit of its own last decimal (0.005 at two decimals). A printed mean may
therefore differ from the exact mean of its cells by at most 0.055 when the coarsest cell has one
decimal. Differences within that bound are legitimate (a source that averaged unrounded values) but are
never silent: each is returned as a `Discrepancy`, tied to the `KNOWN_ISSUES` entry that explains it;
the tests fail when the shipped file has one that no entry explains.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.core.errors import UserError
from benchmark.run.results import PROJECT_ROOT
from tasks import GROUPS, TASKS

REFERENCE_CSV = PROJECT_ROOT / "results" / "reference" / "vtab1k_reported.csv"

TASK_COLUMNS: tuple[str, ...] = tuple(t.id for t in TASKS)
GROUP_TASKS: dict[str, tuple[str, ...]] = {g: tuple(t.id for t in TASKS if t.group == g) for g in GROUPS}
MEAN_COLUMNS: tuple[str, ...] = (*GROUPS, "avg_groups", "avg_19")
COLUMNS: tuple[str, ...] = (
    "method",
    "source",
    "selection_protocol",
    "backbone_weights",
    *TASK_COLUMNS,
    *MEAN_COLUMNS,
    "params_m",
    "confirmed",
)

# The reference table's protocol vocabulary (`results/reference/README.md`, "Protocol labels").
SELECTION_PROTOCOLS: dict[str, str] = {
    "val-tuned-last-epoch-5seeds": "hyper-parameters tuned on val200, last-epoch test accuracy, mean of 5 seeds",
    "val-tuned-last-epoch-1seed": "hyper-parameters tuned on val200, last-epoch test accuracy, 1 seed",
    "best-test-every-epoch-1seed": "best test accuracy over all epochs (selected on test), 1 seed",
    "best-test-every10-1seed": "best of the test accuracies every 10 epochs (selected on test), 1 seed",
    "unknown": "not documented by the source",
}
# Backbone weights of the reported rows, as timm names.
BACKBONE_WEIGHTS: dict[str, str] = {
    "orig_in21k": "vit_base_patch16_224.orig_in21k",
    "augreg_in21k": "vit_base_patch16_224.augreg_in21k",
}
CONFIRMED = ("yes", "partial", "no")
# Every reported row trained for 100 epochs (the recipes of the suite's specs).
REPORTED_EPOCHS = 100

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_METHOD = re.compile(r"^[a-z][a-z0-9_]*$")
ISSUE_KINDS = ("published-means", "computed", "unconfirmed", "note")


class ReferenceDataError(UserError):
    """The reference CSV breaks a rule; the message names the file, line, column and the problem."""


@dataclass(frozen=True)
class KnownIssue:
    """A documented peculiarity of some reference rows, listed here rather than hidden.

    Attributes:
        methods: the rows' `method` values.
        source_contains: a text the rows' `source` contains.
        kind: `published-means`: the columns hold the source's means, which differ from the means of the
            printed cells within rounding; `computed`: the columns hold means computed from the cells where
            the source prints another value; `unconfirmed`: the columns were not checked against the source;
            `note`: anything else a reader of these numbers should know.
        columns: the columns concerned.
        note: what it is, in one sentence.
    """

    methods: tuple[str, ...]
    source_contains: str
    kind: str
    columns: tuple[str, ...]
    note: str

    def applies_to(self, method: str, source: str) -> bool:
        return method in self.methods and self.source_contains in source


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        ("full",), "VPT paper", "published-means", ("natural", "specialized", "avg_groups"),
        "the VPT paper's means were taken before its cells were rounded to one decimal; the printed cells give "
        "75.89 / 83.38 / 68.97 against the published 75.88 / 83.36 / 68.96",
    ),
    KnownIssue(
        ("vpt_deep",), "VPT paper", "published-means", ("natural", "structured", "avg_groups"),
        "the VPT paper's means were taken before its cells were rounded to one decimal; the printed cells give "
        "78.49 / 55.00 / 71.97 against the published 78.48 / 54.98 / 71.96",
    ),
    KnownIssue(
        ("adapter", "lora", "noah"), "NOAH paper Table 1", "computed", ("avg_groups",),
        "NOAH prints the mean of groups at one decimal (LoRA 74.5); the value here is the two-decimal mean of "
        "the cells",
    ),
    KnownIssue(
        ("vpt_shallow",), "VPT paper", "computed", ("specialized",),
        "computed from the cells; a printed 79.66 could not be confirmed",
    ),
    KnownIssue(
        ("e2vpt",), "E2VPT paper", "unconfirmed", (*TASK_COLUMNS, "avg_19"),
        "the per-task cells (and so avg_19) were not checked against the paper's per-task table; they "
        "reproduce its published group means exactly",
    ),
    KnownIssue(
        ("convpass_attn",), "JieShibo/PETL-ViT", "note", ("caltech101",),
        "the Convpass report's Table 1 prints 90.7 (the README's 90.62 is used)",
    ),
    KnownIssue(
        ("ssf",), "V-PETL Bench", "note", (),
        "SSF ran on AugReg IN-21k weights with 0.5/0.5 normalisation",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Discrepancy:
    """A mean in the file that differs, within rounding, from the exact mean of the row's cells.

    Attributes:
        line: the row's line in the file.
        method: the row's method.
        source: the row's source.
        column: the mean's column.
        value: the value in the file.
        recomputed: the exact mean of the cells (not rounded).
        tolerance: the largest difference rounding allows.
        issue: the `KNOWN_ISSUES` entry that explains it, or None when none does.
    """

    line: int
    method: str
    source: str
    column: str
    value: Decimal
    recomputed: Decimal
    tolerance: Decimal
    issue: KnownIssue | None

    @property
    def rounded(self) -> Decimal:
        """The recomputed mean rounded half-up to the value's decimals, as it would be printed."""
        return _round(self.recomputed, _decimals(self.value))


@dataclass
class ReferenceTable:
    """A checked reference file.

    Attributes:
        path: the file.
        frame: one row per data row: the text columns, every number as a float (NaN when empty), `line`.
        discrepancies: every mean that differs from the exact mean of its cells within rounding.
    """

    path: Path
    frame: pd.DataFrame
    discrepancies: list[Discrepancy] = field(default_factory=list)

    def methods(self) -> list[str]:
        """Methods with at least one row, sorted."""
        return sorted(self.frame.method.unique())

    def rows(self, method: str) -> pd.DataFrame:
        """The rows of one method, in file order."""
        return self.frame[self.frame.method == method]


def source_label(source: str) -> str:
    """A short name for a source: its first clause, "X via Y" for "as reproduced in Y", repositories by name.

    E.g. "VPT paper via NOAH paper Table 1", "JieShibo/PETL-ViT", "OSU-MLB/PETL_Vision".
    """

    def first(text: str) -> str:
        text = re.split(r" \(|[,;]", text.strip(), maxsplit=1)[0].strip()
        text = text.removeprefix("the ")
        word = text.split(" ", 1)[0]
        return word if "/" in word else text

    head, sep, tail = source.partition("as reproduced in ")
    return f"{first(head)} via {first(tail)}" if sep else first(source)


def issues_for(method: str, source: str) -> list[KnownIssue]:
    """The `KNOWN_ISSUES` entries that concern a row."""
    return [i for i in KNOWN_ISSUES if i.applies_to(method, source)]


def _decimals(value: Decimal) -> int:
    return max(0, -int(value.as_tuple().exponent))


def _half_unit(decimals: int) -> Decimal:
    return Decimal(5).scaleb(-(decimals + 1))


def _round(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _mean(values: list[Decimal]) -> Decimal:
    return sum(values, Decimal(0)) / len(values)


def load_reference(path: str | Path | None = None) -> ReferenceTable:
    """Read and check a reference CSV (default: the shipped `results/reference/vtab1k_reported.csv`).

    Raises:
        ReferenceDataError: the file is missing, unreadable or breaks a rule; one line says where and what.
    """
    path = Path(path).expanduser() if path is not None else REFERENCE_CSV
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReferenceDataError(
            f"reference file {path} does not exist; pass an existing CSV to --reference"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReferenceDataError(f"cannot read reference file {path} ({e}); pass a UTF-8 CSV to --reference") from None

    def fail(line: int, what: str, row: str = "", column: str = "") -> ReferenceDataError:
        where = f"{path}, line {line}" + (f" ({row})" if row else "") + (f", column {column}" if column else "")
        return ReferenceDataError(f"{where}: {what}")

    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise fail(1, f"not a valid CSV ({e})") from None
    if not header or not any(h.strip() for h in header):
        raise fail(1, f"the file is empty; it needs the header {','.join(COLUMNS)}")
    header = [h.strip() for h in header]
    for name in header:
        if header.count(name) > 1:
            raise fail(1, f"column {name!r} appears {header.count(name)} times in the header")
    if unknown := [h for h in header if h not in COLUMNS]:
        raise fail(1, f"unknown column {unknown[0]!r}; the columns are {', '.join(COLUMNS)}")
    if missing := [c for c in COLUMNS if c not in header]:
        raise fail(1, f"missing column {missing[0]!r} (task columns are the canonical ids: {', '.join(TASK_COLUMNS)})")

    rows: list[dict[str, object]] = []
    discrepancies: list[Discrepancy] = []
    seen: dict[tuple[str, str], int] = {}
    numeric_columns = (*TASK_COLUMNS, *MEAN_COLUMNS, "params_m")
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise fail(start, f"not a valid CSV row ({e})") from None
        line, start = start, reader.line_num + 1
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise fail(line, f"{len(fields)} fields where the header has {len(header)}; check for a stray or "
                             "missing comma (quote text that contains commas)")  # fmt: skip
        raw = {name: value.strip() for name, value in zip(header, fields, strict=True)}
        method = raw["method"]
        label = method or "?"
        if not _METHOD.match(method):
            raise fail(line, f"method {method!r} is not a lower_snake name", label, "method")
        if not raw["source"]:
            raise fail(line, "the source is empty; say where the numbers were printed", label, "source")
        checks = (
            ("selection_protocol", SELECTION_PROTOCOLS, "protocol label"),
            ("backbone_weights", BACKBONE_WEIGHTS, "backbone"),
            ("confirmed", CONFIRMED, "value"),
        )
        for column, known, what in checks:
            if raw[column] not in known:
                raise fail(line, f"unknown {what} {raw[column]!r}; use one of {', '.join(known)}", label, column)
        key = (method, raw["source"])
        if key in seen:
            raise fail(line, f"repeats the method and source of line {seen[key]}", label, "source")
        seen[key] = line

        numbers: dict[str, Decimal | None] = {}
        for column in numeric_columns:
            value = raw[column]
            if not value:
                numbers[column] = None
                continue
            if not _NUMBER.match(value):
                raise fail(line, f"{value!r} is not a number; write it like 78.8, or leave it empty", label, column)
            number = Decimal(value)
            upper = None if column == "params_m" else Decimal(100)
            if number < 0 or (upper is not None and number > upper):
                bounds = "non-negative" if upper is None else "between 0 and 100 (top-1 accuracy in %)"
                raise fail(line, f"{value} is outside the allowed range: it must be {bounds}", label, column)
            numbers[column] = number
        if all(numbers[c] is None for c in (*TASK_COLUMNS, *MEAN_COLUMNS)):
            raise fail(line, "the row has no accuracy at all; fill the task cells or the means", label)

        discrepancies += _check_means(line, method, raw["source"], numbers, fail, label)
        row: dict[str, object] = {c: raw[c] for c in ("method", "source", "selection_protocol", "backbone_weights")}
        row.update({c: np.nan if numbers[c] is None else float(numbers[c]) for c in numeric_columns})
        row["confirmed"] = raw["confirmed"]
        row["line"] = line
        rows.append(row)
    if not rows:
        raise fail(2, "the file has a header but no rows")
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "line"])
    return ReferenceTable(path, frame, discrepancies)


def _check_means(
    line: int,
    method: str,
    source: str,
    numbers: dict[str, Decimal | None],
    fail: Callable[..., ReferenceDataError],
    label: str,
) -> list[Discrepancy]:
    """Compare each mean with the exact mean of its cells; return the differences rounding allows."""
    exact: dict[str, tuple[Decimal, int]] = {}  # column -> (exact mean, decimals of its coarsest cell)
    for group, members in GROUP_TASKS.items():
        cells = [numbers[t] for t in members]
        if all(c is not None for c in cells):
            exact[group] = (_mean(cells), min(_decimals(c) for c in cells))
    if len(exact) == len(GROUPS):
        exact["avg_groups"] = (_mean([exact[g][0] for g in GROUPS]), min(exact[g][1] for g in GROUPS))
        cells = [numbers[t] for t in TASK_COLUMNS]
        exact["avg_19"] = (_mean(cells), min(_decimals(c) for c in cells))
    issues = [i for i in issues_for(method, source) if i.kind == "published-means"]
    found = []
    for column, (mean, cell_decimals) in exact.items():
        value = numbers[column]
        if value is None:
            continue
        decimals = _decimals(value)
        if _round(mean, decimals) == value:
            continue
        tolerance = _half_unit(cell_decimals) + _half_unit(decimals)
        what = "mean of the three group means" if column == "avg_groups" else "mean of its cells"
        if abs(value - mean) > tolerance:
            raise fail(line, f"{value} is not the {what} ({_round(mean, 4)}); rounding explains at most "
                             f"{tolerance}, so a cell or the mean is wrong", label, column)  # fmt: skip
        issue = next((i for i in issues if column in i.columns), None)
        found.append(Discrepancy(line, method, source, column, value, mean, tolerance, issue))
    printed = [numbers[g] for g in GROUPS]
    if numbers["avg_groups"] is not None and all(p is not None for p in printed):
        # The printed mean of groups must also agree with the printed group means (both rounded).
        mean = _mean(printed)
        tolerance = _half_unit(min(_decimals(p) for p in printed)) + _half_unit(_decimals(numbers["avg_groups"]))
        if abs(numbers["avg_groups"] - mean) > tolerance:
            raise fail(line, f"{numbers['avg_groups']} is not the mean of the printed group means "
                             f"({_round(mean, 4)}; rounding explains at most {tolerance})", label, "avg_groups")  # fmt: skip
    return found
