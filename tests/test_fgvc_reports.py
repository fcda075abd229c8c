"""FGVC in the reports: its reference file checked like VTAB-1k's, `compare` and `compare --table` per suite, and
the leaderboard's FGVC board beside an unchanged VTAB-1k one."""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.papers.reference import (
    FGVC_REFERENCE_CSV,
    FGVC_TASK_COLUMNS,
    ReferenceDataError,
    load_reference,
)
from tasks import list_tasks
from tests.test_compare import SEEDS, write_run

FGVC = load_reference(suite="fgvc")
VPT_ROW = "VPT paper (Jia"


def fgvc_row(method: str, source: str) -> pd.Series:
    rows = FGVC.rows(method)
    return rows[rows.source.str.contains(source, regex=False)].iloc[0]


def test_fgvc_reference_has_the_papers_rows_in_the_suites_columns():
    assert FGVC.suite == "fgvc" and tuple(t.id for t in list_tasks(suite="fgvc")) == FGVC_TASK_COLUMNS
    assert load_reference(FGVC_REFERENCE_CSV).suite == "fgvc"  # a file's suite is read from its header
    frame = FGVC.frame
    for method in ("full", "linear", "vpt_shallow", "vpt_deep", "e2vpt", "bitfit", "adapter", "adaptformer", "lora",
                   "ssf", "gps"):  # fmt: skip
        rows = FGVC.rows(method, "vit_b16_in21k")  # other backbones' rows print only the mean
        assert rows[[*FGVC_TASK_COLUMNS, "mean"]].notna().all().all(), method
    # Bias/BitFit: VPT's baseline and V-PETL Bench's row, told apart by their sources.
    bias, bitfit = fgvc_row("bitfit", VPT_ROW), fgvc_row("bitfit", "V-PETL Bench README (")
    assert (bias.cub, bias["mean"], bitfit.cub, bitfit["mean"]) == (88.4, 88.41, 87.7, 88.02)
    assert set(frame[frame.backbone_weights == "augreg_in21k"].method) == {"ssf"}
    assert fgvc_row("vpt_deep", VPT_ROW)[["cub", "stanfordcars", "mean", "params_m"]].tolist() == [
        88.5, 83.6, 89.11, 0.85]  # fmt: skip
    # Recomputed here, independently of the loader: every mean that is not the rounded mean of its five cells is a
    # discrepancy the loader reports, and each is explained by a known issue.
    rows = list(csv.DictReader(io.StringIO(FGVC_REFERENCE_CSV.read_text())))
    off = set()
    for line, row in enumerate(rows, start=2):
        if all(row[t] for t in FGVC_TASK_COLUMNS):
            mean = sum(Decimal(row[t]) for t in FGVC_TASK_COLUMNS) / 5
            printed = Decimal(row["mean"])
            assert abs(printed - mean) <= Decimal("0.1"), line
            if mean.quantize(printed) != printed:
                off.add(line)
    assert off and {d.line for d in FGVC.discrepancies} == off
    assert all(d.issue is not None for d in FGVC.discrepancies)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (",88.54,", ",88.64,", r"line 2 \(full\), column mean: 88.64 is not the mean of its five datasets \(88.54"),
        (",87.3,82.7,", ",101,82.7,", r"column cub: 101 is outside the allowed range"),
        (
            "val-tuned-unknown-aggregation,vit_b16_in21k,orig_in21k,87.3",
            "best-of-everything,vit_b16_in21k,orig_in21k,87.3",
            r"column selection_protocol: unknown protocol label 'best-of-everything'; use one of val-tuned-unknown",
        ),
        (",85.98,yes", ",85.98,maybe", r"column confirmed: unknown value 'maybe'"),
        (",stanfordcars,mean,", ",stanfordcars,avg,", r"line 1: unknown column 'avg'"),
    ],
)
def test_a_broken_fgvc_row_is_refused(old, new, message, tmp_path, capsys):
    text = FGVC_REFERENCE_CSV.read_text()
    assert old in text
    bad = tmp_path / "fgvc.csv"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ReferenceDataError, match=message):
        load_reference(bad, suite="fgvc")
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    capsys.readouterr()
    assert main(["leaderboard", "--results", str(results), "--reported", "--reference", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err) and "Traceback" not in err, err


OFFSETS = (-0.4, -0.2, 0.0, 0.2, 0.4)


def fgvc_results(results: Path, method: str = "vpt_deep", delta: float = -1.0) -> None:
    """Five seeds per FGVC dataset around VPT's reported cell (+ delta)."""
    ref = fgvc_row(method, VPT_ROW)
    for task in FGVC_TASK_COLUMNS:
        for seed, offset in zip(SEEDS, OFFSETS, strict=True):
            write_run(results, method, task, seed, ref[task] + delta + offset)


def vtab_results(results: Path) -> None:
    for task, acc in (("dtd", 60.0), ("svhn", 70.0)):
        for seed in SEEDS[:2]:
            write_run(results, "vpt_deep", task, seed, acc + seed / 1000)


def test_compare_puts_fgvc_results_beside_fgvc_rows_only(tmp_path, capsys):
    results = tmp_path / "r"
    fgvc_results(results)
    vtab_results(results)
    assert main(["compare", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    fgvc = pd.read_csv(results / "compare-fgvc.csv")
    vtab = pd.read_csv(results / "compare.csv")
    # Never mixed: each file's lines are its own suite's tasks and means.
    assert set(fgvc.row) == {*FGVC_TASK_COLUMNS, "mean"}
    assert not set(vtab.row) & set(FGVC_TASK_COLUMNS) and "avg_19" in set(vtab.row)
    vpt = fgvc[fgvc.source == "VPT paper via V-PETL Bench README"].set_index("row")
    ref = fgvc_row("vpt_deep", VPT_ROW)
    for task in FGVC_TASK_COLUMNS:
        assert vpt.loc[task, "reported"] == ref[task]
        assert vpt.loc[task, "diff"] == pytest.approx(-1.0) and vpt.loc[task, "ours_seeds"] == 5
    mean = vpt.loc["mean"]
    assert mean.ours_mean == pytest.approx(sum(ref[t] for t in FGVC_TASK_COLUMNS) / 5 - 1.0)
    assert mean.reported == 89.11 and mean.kind == "average" and mean.within_spread == "no"
    # VPT's FGVC aggregation is not documented: a protocol mismatch, said so, not a like-for-like row.
    assert mean.protocols_match == "no" and "val-tuned-unknown-aggregation" in mean.mismatch
    md = (results / "compare-fgvc.md").read_text()
    assert md.startswith("# Ours vs. the papers (FGVC top-1 %)") and "train → test" in md
    assert "mean ours 88.10 vs 89.11" in out and "compare-fgvc.md" in out


def test_compare_table_vpt_shows_both_halves(tmp_path, capsys):
    results = tmp_path / "r"
    fgvc_results(results, delta=0.0)
    vtab_results(results)
    assert main(["compare", "--results", str(results), "--table", "vpt"]) == 0
    md = (results / "compare-vpt.md").read_text()
    assert md in capsys.readouterr().out
    assert md.index("per-task VTAB-1k table") < md.index("FGVC table: top-1 %")
    fgvc_half = md[md.index("FGVC table: top-1 %") :]
    assert "fgvc_reported.csv" in fgvc_half and "| cub " in fgvc_half and "cifar100" not in fgvc_half
    view = pd.read_csv(results / "compare-vpt.csv")
    half = view[view.suite == "fgvc"]
    assert list(dict.fromkeys(half.row)) == ["Full", "Linear", "Bias", "VPT-Shallow", "VPT-Deep"]
    deep = half[half.row == "VPT-Deep"].set_index("side")
    assert deep.loc["reported", "mean"] == 89.11 and deep.loc["reported", "cub"] == 88.5
    assert deep.loc["ours", "cub"] == pytest.approx(88.5) and deep.loc["ours", "mean"] == pytest.approx(89.10)
    # The VTAB-1k half sees only the VTAB-1k runs.
    vtab_deep = view[(view.suite == "vtab1k") & (view.row == "VPT-Deep") & (view.side == "ours")].iloc[0]
    assert vtab_deep.dtd == pytest.approx(60.043) and pd.isna(vtab_deep.natural)


def test_leaderboard_adds_an_fgvc_board_and_leaves_vtabs_unchanged(tmp_path, capsys):
    results = tmp_path / "r"
    vtab_results(results)
    assert main(["leaderboard", "--results", str(results)]) == 0
    before = {name: (results / name).read_bytes() for name in ("leaderboard.md", "leaderboard.csv")}
    assert not (results / "leaderboard-fgvc.csv").exists()
    fgvc_results(results)
    fgvc_results(results, "linear", delta=-2.0)
    capsys.readouterr()
    assert main(["leaderboard", "--results", str(results), "--reported"]) == 0
    out = capsys.readouterr().out
    md = (results / "leaderboard.md").read_text()
    vtab_part, fgvc_part = md.split("# Leaderboard: FGVC")
    # VTAB-1k's board as it was (the reported rows aside), FGVC's results in none of its files.
    assert (results / "leaderboard.csv").read_bytes().count(b"cub") == 0
    assert "cub" not in vtab_part and "| dtd " in vtab_part
    # FGVC's board: a column per dataset and their mean; ours first by mean, then the papers' rows.
    board = pd.read_csv(results / "leaderboard-fgvc.csv")
    ours = board[board.kind == "ours"].set_index("method")
    assert list(ours.index) == ["vpt_deep", "linear"]
    assert ours.loc["vpt_deep", "avg_tasks_mean"] == pytest.approx(89.10 - 1.0)
    assert ours.loc["linear", "cub_mean"] == pytest.approx(85.3 - 2.0) and ours.loc["linear", "tasks"] == 5
    assert set(board[board.kind == "reported"].method) == {"vpt_deep", "linear"}
    header = next(line for line in fgvc_part.splitlines() if line.startswith("| kind"))
    assert re.search(r"\| cub +\| nabirds .*\| stanfordcars +\| mean +\|", header)
    assert "88.1 ± 0.3" in fgvc_part and "89.11" in fgvc_part and fgvc_part in out
    page = (results / "leaderboard.html").read_text()
    assert 'id="fgvc-board"' in page and '<svg id="plot-fgvc"' in page and '<table id="fgvc"' in page
    assert (results / "accuracy_vs_params-fgvc.png").read_bytes().startswith(b"\x89PNG")
    # Without the papers' rows, VTAB-1k's files are byte for byte what they were without FGVC results.
    assert main(["leaderboard", "--results", str(results)]) == 0
    assert (results / "leaderboard.csv").read_bytes() == before["leaderboard.csv"]
    assert (results / "leaderboard.md").read_bytes().startswith(before["leaderboard.md"])
    # --suite: one suite's board only.
    capsys.readouterr()
    assert main(["leaderboard", "--results", str(results), "--suite", "fgvc"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Leaderboard: FGVC") and "dtd" not in out
    assert main(["leaderboard", "--results", str(results), "--suite", "vtab1k"]) == 0
    out = capsys.readouterr().out
    assert "FGVC" not in out and (results / "leaderboard.md").read_bytes() == before["leaderboard.md"]


def test_fgvc_section_of_the_page_in_chromium(tmp_path):
    """The page's filters reach the FGVC board's rows and points too (its rows are not VTAB-1k's)."""
    from benchmark.report import screenshot as browser

    reason = browser.missing()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    results = tmp_path / "r"
    vtab_results(results)
    fgvc_results(results)
    fgvc_results(results, "linear", delta=-2.0)
    assert main(["leaderboard", "--results", str(results)]) == 0
    driver = browser.chromium()
    try:
        driver.get((results / "leaderboard.html").as_uri())
        shown = """return Array.from(document.querySelectorAll(arguments[0])).filter((e) => !e.hidden).length"""
        assert driver.execute_script(shown, "#fgvc tbody tr") == 2
        assert driver.execute_script(shown, "#plot-fgvc .pt") == 2
        assert driver.find_element("id", "shown").text == "3 of 3 rows shown"
        driver.find_element("id", "filter").send_keys("linear")
        assert driver.execute_script(shown, "#fgvc tbody tr") == 1
        assert driver.execute_script(shown, "#summary tbody tr") == 0
        # Its average is named as the papers name it.
        header = driver.find_element("css selector", "#fgvc th[title^='plain mean']")
        assert header.text == "mean"
    finally:
        driver.quit()
