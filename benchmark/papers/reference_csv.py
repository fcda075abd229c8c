"""Reading a reference CSV of published numbers: the rules every suite's file obeys, and the rounding arithmetic.

A `Layout` names a suite's columns (text columns, task cells, means, `params_m`, `confirmed`) and how its means
are checked against its cells; `read_reference` reads one file under a layout and refuses it with one line
(file, line, column, what is wrong) when: a column is missing, unknown or repeated; a row has the wrong number
of fields; a number is not a plain decimal or lies outside 0–100; a label is not one of the known ones (the
`backbone` id among them, and checkpoints of another backbone than the row's); a (method, source, backbone)
triple repeats; a row has no accuracy at all; or the layout's mean check fails.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.core.errors import UserError
from benchmark.papers.backbones import DEFAULT_REFERENCE_BACKBONE

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
METHOD = re.compile(r"^[a-z][a-z0-9_]*$")
TEXT_COLUMNS = ("method", "source", "selection_protocol", "backbone", "backbone_weights")
CONFIRMED = ("yes", "partial", "no")
ISSUE_KINDS = ("published-means", "computed", "unconfirmed", "misprint", "note")


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
            `misprint`: the columns hold the source's printed means although they disagree with its printed
            cells or group means by more than rounding allows (the loader accepts them only in these columns);
            `note`: anything else a reader of these numbers should know.
        columns: the columns concerned.
        note: what it is, in one sentence.
        backbones: the rows' `backbone` ids.
    """

    methods: tuple[str, ...]
    source_contains: str
    kind: str
    columns: tuple[str, ...]
    note: str
    backbones: tuple[str, ...] = (DEFAULT_REFERENCE_BACKBONE,)

    def applies_to(self, method: str, source: str, backbone: str = DEFAULT_REFERENCE_BACKBONE) -> bool:
        return method in self.methods and self.source_contains in source and backbone in self.backbones


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
        issue: the known issue that explains it, or None when none does.
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
        return round_half_up(self.recomputed, decimals(self.value))


# (line, method, source, numbers, fail, label, backbone) -> the discrepancies rounding allows; raises through `fail`.
MeansCheck = Callable[[int, str, str, "dict[str, Decimal | None]", Callable[..., ReferenceDataError], str, str],
                      "list[Discrepancy]"]  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """The columns of one suite's reference file and how its means are checked.

    Attributes:
        suite: the suite id (`tasks.suites.SUITES`).
        task_columns: the task cells, in the suite's task order.
        mean_columns: the means, in file order.
        protocols: the known `selection_protocol` labels.
        backbones: the known `backbone_weights` labels.
        check_means: compares each mean with its cells (`MeansCheck`).
        reference_backbones: the known `backbone` ids, each with the `backbone_weights` labels it allows.
    """

    suite: str
    task_columns: tuple[str, ...]
    mean_columns: tuple[str, ...]
    protocols: Mapping[str, str]
    backbones: Mapping[str, str]
    check_means: MeansCheck
    reference_backbones: Mapping[str, tuple[str, ...]]

    @property
    def columns(self) -> tuple[str, ...]:
        return (*TEXT_COLUMNS, *self.task_columns, *self.mean_columns, "params_m", "confirmed")

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        return (*self.task_columns, *self.mean_columns, "params_m")


def decimals(value: Decimal) -> int:
    """How many decimals a number was printed with."""
    return max(0, -int(value.as_tuple().exponent))


def half_unit(places: int) -> Decimal:
    """Half a unit of the last of `places` decimals: how far a value printed so may lie from the true one."""
    return Decimal(5).scaleb(-(places + 1))


def round_half_up(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def mean_of(values: list[Decimal]) -> Decimal:
    return sum(values, Decimal(0)) / len(values)


def check_mean(
    column: str, value: Decimal | None, exact: tuple[Decimal, int], what: str, found: list[Discrepancy], **row
) -> None:
    """Compare one printed mean with the exact mean of its cells (`exact`: mean, decimals of the coarsest cell).

    Equal after rounding: nothing. Within rounding: a `Discrepancy` appended to `found` (tied to the first
    issue of `row["issues"]` that names the column). Further: `row["fail"]` raised.
    """
    if value is None:
        return
    mean, cell_decimals = exact
    places = decimals(value)
    if round_half_up(mean, places) == value:
        return
    tolerance = half_unit(cell_decimals) + half_unit(places)
    if abs(value - mean) > tolerance:
        raise row["fail"](row["line"], f"{value} is not the {what} ({round_half_up(mean, 4)}); rounding explains at "
                          f"most {tolerance}, so a cell or the mean is wrong", row["label"], column)  # fmt: skip
    issue = next((i for i in row["issues"] if column in i.columns), None)
    found.append(Discrepancy(row["line"], row["method"], row["source"], column, value, mean, tolerance, issue))


def read_reference(path: Path, layout: Layout) -> tuple[pd.DataFrame, list[Discrepancy]]:
    """Read and check one reference file under `layout`: its rows (text columns, numbers as floats, NaN when
    empty, `line`) and the discrepancies within rounding.

    Raises:
        ReferenceDataError: the file is missing, unreadable or breaks a rule; one line says where and what.
    """
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

    columns = layout.columns
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise fail(1, f"not a valid CSV ({e})") from None
    if not header or not any(h.strip() for h in header):
        raise fail(1, f"the file is empty; it needs the header {','.join(columns)}")
    header = [h.strip() for h in header]
    for name in header:
        if header.count(name) > 1:
            raise fail(1, f"column {name!r} appears {header.count(name)} times in the header")
    if unknown := [h for h in header if h not in columns]:
        raise fail(1, f"unknown column {unknown[0]!r}; the columns are {', '.join(columns)}")
    if missing := [c for c in columns if c not in header]:
        raise fail(1, f"missing column {missing[0]!r} (task columns are the canonical ids: "
                      f"{', '.join(layout.task_columns)})")  # fmt: skip

    rows: list[dict[str, object]] = []
    discrepancies: list[Discrepancy] = []
    seen: dict[tuple[str, str, str], int] = {}
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
        if not METHOD.match(method):
            raise fail(line, f"method {method!r} is not a lower_snake name", label, "method")
        if not raw["source"]:
            raise fail(line, "the source is empty; say where the numbers were printed", label, "source")
        checks = (
            ("selection_protocol", layout.protocols, "protocol label"),
            ("backbone_weights", layout.backbones, "backbone"),
            ("confirmed", CONFIRMED, "value"),
        )
        for column, known, what in checks:
            if raw[column] not in known:
                raise fail(line, f"unknown {what} {raw[column]!r}; use one of {', '.join(known)}", label, column)
        backbone = raw["backbone"]
        if backbone not in layout.reference_backbones:
            raise fail(line, f"unknown backbone id {backbone!r}; use one of {', '.join(layout.reference_backbones)}",
                       label, "backbone")  # fmt: skip
        if raw["backbone_weights"] not in (allowed := layout.reference_backbones[backbone]):
            raise fail(line, f"checkpoint {raw['backbone_weights']!r} is not one of backbone {backbone}'s; use one of "
                             f"{', '.join(allowed)} (or the backbone id of that checkpoint)", label, "backbone_weights")  # fmt: skip
        key = (method, raw["source"], backbone)
        if key in seen:
            raise fail(
                line, f"repeats the method and source of line {seen[key]} on the same backbone", label, "source"
            )
        seen[key] = line

        numbers: dict[str, Decimal | None] = {}
        for column in layout.numeric_columns:
            value = raw[column]
            if not value:
                numbers[column] = None
                continue
            if not NUMBER.match(value):
                raise fail(line, f"{value!r} is not a number; write it like 78.8, or leave it empty", label, column)
            number = Decimal(value)
            upper = None if column == "params_m" else Decimal(100)
            if number < 0 or (upper is not None and number > upper):
                bounds = "non-negative" if upper is None else "between 0 and 100 (top-1 accuracy in %)"
                raise fail(line, f"{value} is outside the allowed range: it must be {bounds}", label, column)
            numbers[column] = number
        if all(numbers[c] is None for c in (*layout.task_columns, *layout.mean_columns)):
            raise fail(line, "the row has no accuracy at all; fill the task cells or the means", label)

        discrepancies += layout.check_means(line, method, raw["source"], numbers, fail, label, backbone)
        row: dict[str, object] = {c: raw[c] for c in TEXT_COLUMNS}
        row.update({c: np.nan if numbers[c] is None else float(numbers[c]) for c in layout.numeric_columns})
        row["confirmed"] = raw["confirmed"]
        row["line"] = line
        rows.append(row)
    if not rows:
        raise fail(2, "the file has a header but no rows")
    return pd.DataFrame(rows, columns=[*columns, "line"]), discrepancies
