"""The reported numbers: the shipped file's checks, its known discrepancies, and malformed files refused."""

from __future__ import annotations

import csv
import io
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

import methods
from benchmark.papers.reference import (
    COLUMNS,
    KNOWN_ISSUES,
    REFERENCE_CSV,
    SELECTION_PROTOCOLS,
    TASK_COLUMNS,
    ReferenceDataError,
    issues_for,
    load_reference,
    source_label,
)
from tasks import GROUPS, TASKS

SUITE_METHODS_WITH_NUMBERS = {
    "full", "linear", "vpt_shallow", "vpt_deep", "e2vpt", "convpass", "convpass_attn", "lora", "adapter",
    "adapter_houlsby", "adaptformer", "bitfit", "ssf", "fact_tt", "fact_tk", "repadapter",
}  # fmt: skip


def test_shipped_reference_loads_with_canonical_columns_and_labels():
    table = load_reference()
    frame = table.frame
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert tuple(t.id for t in TASKS) == TASK_COLUMNS and len(TASK_COLUMNS) == 19
    assert set(frame.selection_protocol) <= set(SELECTION_PROTOCOLS)
    numbers = frame[[*TASK_COLUMNS, *GROUPS, "avg_groups", "avg_19"]]
    assert ((numbers >= 0) & (numbers <= 100) | numbers.isna()).all().all()
    # Every registered method has reported numbers except the two the papers never ran on VTAB-1k and the peft
    # tuners, which no VTAB-1k table prints (docs/methods/peft_tuners.md).
    registered = set(methods.list_methods())
    assert (registered & set(table.methods())) >= SUITE_METHODS_WITH_NUMBERS
    unreported = {m for m in registered - set(table.methods()) if m != "peft" and not m.startswith("peft_")}
    assert unreported == {"lion", "pgn"}
    # Every method with a published ViT-B/16 IN-21k row runs in the suite (27 of 27, NOAH's, GPS's and SPT's included).
    vit_b = set(frame[frame.backbone == "vit_b16_in21k"].method)
    assert vit_b <= registered and len(vit_b) == 27
    vpt = frame[(frame.method == "vpt_deep") & frame.source.str.contains("V-PETL")].iloc[0]
    assert (vpt.cifar100, vpt.avg_groups, vpt.avg_19, vpt.line) == (78.8, 71.96, 69.43, 7)


def _half_up(x: Decimal) -> Decimal:
    return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def test_group_means_recompute_to_the_printed_values_except_the_listed_ones():
    """Recomputed here independently of the loader: any difference not listed in KNOWN_ISSUES fails."""
    rows = list(csv.DictReader(io.StringIO(REFERENCE_CSV.read_text())))
    found, checked = set(), 0
    for line, row in enumerate(rows, start=2):
        if not all(row[t] for t in TASK_COLUMNS):
            continue
        means = {}
        for group in GROUPS:
            cells = [Decimal(row[t.id]) for t in TASKS if t.group == group]
            means[group] = sum(cells) / len(cells)
        means["avg_groups"] = sum(means.values()) / 3
        means["avg_19"] = sum(Decimal(row[t]) for t in TASK_COLUMNS) / 19
        for column, mean in means.items():
            checked += 1
            printed = Decimal(row[column])
            assert abs(printed - mean) <= Decimal("0.055"), (line, column)  # one-decimal cells + two-decimal mean
            if _half_up(mean) != printed:
                found.add((line, row["method"], column))
    listed = {
        (line, row["method"], column)
        for line, row in enumerate(rows, start=2)
        for issue in issues_for(row["method"], row["source"])
        if issue.kind == "published-means"
        for column in issue.columns
    }
    assert checked == 23 * 5  # the 23 rows with all 19 cells, five means each
    assert found == listed
    # Full: 3 columns of one row; VPT-deep: 3 columns of each of its three copies of the paper's row.
    assert len(found) == 20
    loaded = {(d.line, d.method, d.column) for d in load_reference().discrepancies}
    assert loaded == found
    assert all(d.issue is not None and d.issue.kind == "published-means" for d in load_reference().discrepancies)


def test_every_known_issue_concerns_a_row_and_unconfirmed_rows_are_listed():
    frame = load_reference().frame
    for issue in KNOWN_ISSUES:
        rows = frame[frame.apply(lambda r, i=issue: i.applies_to(r.method, r.source, r.backbone), axis=1)]
        assert not rows.empty, issue
        assert set(issue.columns) <= set(COLUMNS)
    unconfirmed = frame[frame.confirmed != "yes"]
    assert list(unconfirmed[unconfirmed.backbone == "vit_b16_in21k"].method) == [
        "e2vpt",
        "partial_1",
        "mlp_3",
        "sidetune",
    ]
    for _, r in unconfirmed.iterrows():
        assert any(i.kind == "unconfirmed" for i in issues_for(r.method, r.source, backbone=r.backbone))


def test_source_labels_tell_the_rows_of_a_method_apart():
    frame = load_reference().frame
    labels = frame.assign(label=frame.source.map(source_label))
    assert not labels.duplicated(["backbone", "method", "label"]).any()
    assert set(labels[(labels.method == "vpt_deep") & (labels.backbone == "vit_b16_in21k")].label) == {
        "VPT paper via NOAH paper Table 1",
        "VPT paper via V-PETL Bench README",
        "VPT paper via JieShibo/PETL-ViT",
        "OSU-MLB/PETL_Vision",
    }


# -- malformed files: one line naming the file, the line, the column and the problem -----------------------
def _edited(tmp_path: Path, edit) -> Path:
    rows = list(csv.reader(io.StringIO(REFERENCE_CSV.read_text())))
    edit(rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path = tmp_path / "reported.csv"
    path.write_text(out.getvalue())
    return path


def _set(line: int, column: str, value: str):
    def edit(rows):
        rows[line - 1][rows[0].index(column)] = value

    return edit


def _drop_column(column: str):
    def edit(rows):
        i = rows[0].index(column)
        for r in rows:
            del r[i]

    return edit


def _rename_column(old: str, new: str):
    def edit(rows):
        rows[0][rows[0].index(old)] = new

    return edit


# The line number of a row appended to the shipped file (its header is line 1).
APPENDED = len(REFERENCE_CSV.read_text().splitlines()) + 1
MALFORMED = [
    ("missing-column", _drop_column("dtd"), r"line 1: missing column 'dtd'"),
    ("unknown-column", _rename_column("cifar100", "cifar"), r"line 1: unknown column 'cifar'"),
    ("not-a-number", _set(6, "svhn", "n/a"), r"line 6 \(vpt_deep\), column svhn: 'n/a' is not a number"),
    ("out-of-range", _set(3, "dtd", "101.2"), r"line 3 \(linear\), column dtd: 101.2 is outside .* between 0 and 100"),
    ("negative-params", _set(2, "params_m", "-1"), r"line 2 \(full\), column params_m: -1 .* non-negative"),
    (
        "protocol",
        _set(5, "selection_protocol", "best-val"),
        r"line 5 \(vpt_shallow\), column selection_protocol: "
        r"unknown protocol label 'best-val'; use one of val-tuned-last-epoch-5seeds",
    ),
    (
        "backbone",
        _set(21, "backbone_weights", "in1k"),
        r"line 21 \(e2vpt\), column backbone_weights: unknown backbone",
    ),
    ("confirmed", _set(2, "confirmed", "maybe"), r"column confirmed: unknown value 'maybe'"),
    ("method", _set(2, "method", "Full-FT"), r"line 2 \(Full-FT\), column method: .* not a lower_snake name"),
    (
        "group-mean",
        _set(6, "natural", "79.48"),
        r"line 6 \(vpt_deep\), column natural: 79.48 is not the mean of "
        r"its cells \(78.4857\); rounding explains at most 0.055",
    ),
    (
        "avg-vs-groups",
        _set(2, "avg_groups", "68.99"),
        r"line 2 \(full\), column avg_groups: 68.99 is not the mean "
        r"of the printed group means",
    ),
    ("avg19", _set(16, "avg_19", "74.54"), r"line 16 \(convpass\), column avg_19: 74.54 is not the mean of its cells"),
    ("fields", lambda rows: rows[4].append("1.0"), r"line 5: 32 fields where the header has 31"),
    (
        "duplicate",
        lambda rows: rows.append(list(rows[6])),
        rf"line {APPENDED} \(vpt_deep\), column source: repeats the "
        r"method and source of line 7",
    ),
    (
        "empty-row",
        lambda rows: rows.append(["lora", "somewhere", "unknown", "vit_b16_in21k", "orig_in21k"] + [""] * 25 + ["no"]),
        rf"line {APPENDED} \(lora\): the row has no accuracy at all",
    ),
    ("header-only", lambda rows: rows.__delitem__(slice(1, None)), r"line 2: the file has a header but no rows"),
    ("empty", lambda rows: rows.clear(), r"line 1: the file is empty"),
]


@pytest.mark.parametrize(("case", "edit", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_reference_is_refused_with_one_clear_line(case, edit, message, tmp_path):
    path = _edited(tmp_path, edit)
    with pytest.raises(ReferenceDataError) as e:
        load_reference(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert re.search(message, text), text


def test_an_unedited_copy_loads_identically(tmp_path):
    path = _edited(tmp_path, lambda rows: None)
    assert load_reference(path).frame.drop(columns="line").equals(load_reference().frame.drop(columns="line"))
