"""The papers' rows on other backbones (Swin-B IN-22k, ViT-B/16 MAE and MoCo v3): loaded with their `backbone`,
checked, and never set beside a run on another backbone (`compare`, `compare --table`, `leaderboard --reported`)."""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.papers.backbones import REFERENCE_BACKBONES, run_backbone
from benchmark.papers.reference import (
    FGVC_REFERENCE_CSV,
    REFERENCE_CSV,
    ReferenceDataError,
    issues_for,
    load_reference,
)
from benchmark.report.compare import compare
from benchmark.run.presets import PRESETS
from tasks import GROUPS, TASKS
from tests.test_compare import DEMO, VIT_B, write_run

REFERENCE = load_reference()
FGVC = load_reference(suite="fgvc")
SWIN = {"backbone": "swin_base_patch4_window7_224.ms_in22k", "pretrained": True, "weights": None, "image_size": 224}
MAE = {"backbone": "vit_base_patch16_224.mae", "pretrained": True, "weights": None, "image_size": 224}
MOCO = {"backbone": "vit_base_patch16_224.mocov3", "pretrained": True, "weights": "/w/linear-vit-b-300ep.pth.tar",
        "image_size": 224}  # fmt: skip
TINY_SWIN = {"backbone": "peft_bench_tiny_swin", "pretrained": False, "weights": None, "image_size": 32}
OTHER = ("swin_b_in22k", "vit_b16_mae", "vit_b16_mocov3")


def row(method: str, backbone: str, source: str, table=REFERENCE) -> pd.Series:
    rows = table.rows(method, backbone)
    found = rows[rows.source.str.contains(source, regex=False)]
    assert len(found) == 1, (method, backbone, source)
    return found.iloc[0]


# -- the rows ---------------------------------------------------------------------------------------------------
def test_every_row_names_a_known_backbone_and_the_old_rows_are_vit_b16_in21k():
    assert set(REFERENCE_BACKBONES) == {p.reference for p in PRESETS}
    for table, old in ((REFERENCE, 36), (FGVC, 28)):
        frame = table.frame
        assert set(frame.backbone) <= set(REFERENCE_BACKBONES)
        assert (frame.backbone.iloc[:old] == "vit_b16_in21k").all()  # the rows that were there before
        for backbone, (_, weights) in REFERENCE_BACKBONES.items():
            assert set(frame[frame.backbone == backbone].backbone_weights) <= set(weights)
    counts = REFERENCE.frame.backbone.value_counts().to_dict()
    assert counts == {"vit_b16_in21k": 41, "swin_b_in22k": 13, "vit_b16_mae": 11, "vit_b16_mocov3": 10}


def test_the_published_rows_are_there_as_the_spec_prints_them():
    """docs/backbones.md: group means, mean of groups, params; never a per-task cell."""
    expected = {
        ("vpt_deep", "swin_b_in22k", "Korean"): (76.78, 84.53, 53.35, 71.6, 0.22, "partial"),
        ("full", "swin_b_in22k", "Korean"): (79.10, 86.21, 59.65, 75.0, 86.9, "partial"),
        ("vpt_shallow", "swin_b_in22k", "HyperAdapter"): (79.9, 82.4, 37.8, 66.7, 0.05, "yes"),
        ("repadapter", "swin_b_in22k", "HyperAdapter"): (82.8, 87.2, 61.2, 77.0, 0.39, "yes"),
        ("lora", "swin_b_in22k", "LoRA-8"): (81.7, 87.2, 60.1, 76.3, None, "yes"),
        ("vpt_deep", "vit_b16_mae", "DA-VPT"): (36.02, 60.61, 26.57, 41.73, 0.20, "yes"),
        ("e2vpt", "vit_b16_mae", "DA-VPT"): (59.52, 77.80, 44.65, 60.66, 0.06, "yes"),
        ("full", "vit_b16_mocov3", "DA-VPT"): (71.95, 84.72, 51.98, 69.55, 85.8, "yes"),
        ("e2vpt", "vit_b16_mocov3", "DA-VPT"): (76.47, 87.28, 54.91, 72.88, 0.11, "yes"),
        ("linear", "vit_b16_mae", "SNELL"): (18.9, 52.7, 23.7, None, None, "yes"),
        ("spt_lora", "vit_b16_mocov3", "SNELL"): (76.5, 86.0, 63.6, 75.3, None, "yes"),
        ("bitfit", "vit_b16_mocov3", "row Bias"): (72.9, 81.1, 53.4, None, None, "yes"),
    }
    for (method, backbone, source), (*numbers, confirmed) in expected.items():
        r = row(method, backbone, source)
        got = [r[c] for c in (*GROUPS, "avg_groups", "params_m")]
        assert [None if pd.isna(g) else g for g in got] == numbers, (method, backbone)
        assert r.confirmed == confirmed and r[[t.id for t in TASKS]].isna().all()
    # MoCo v3 has no Partial-1 row in SNELL's table: none is made up.
    assert REFERENCE.rows("partial_1", "vit_b16_mocov3").empty and len(REFERENCE.rows("partial_1", "vit_b16_mae")) == 1
    assert REFERENCE.rows("e2vpt", "swin_b_in22k").empty  # not found (§2.3)
    # FGVC: the mean only, for MAE and MoCo v3 (DA-VPT Table 1); none for E2VPT or Swin-B.
    means = {
        (r.method, r.backbone): r["mean"] for _, r in FGVC.frame[FGVC.frame.backbone != "vit_b16_in21k"].iterrows()
    }
    assert means == {("full", "vit_b16_mae"): 82.80, ("vpt_shallow", "vit_b16_mae"): 57.84,
                     ("vpt_deep", "vit_b16_mae"): 72.02, ("gatevpt", "vit_b16_mae"): 73.39,
                     ("full", "vit_b16_mocov3"): 84.25, ("vpt_shallow", "vit_b16_mocov3"): 79.26,
                     ("vpt_deep", "vit_b16_mocov3"): 83.12, ("gatevpt", "vit_b16_mocov3"): 83.00}  # fmt: skip


def test_means_of_groups_agree_with_the_group_means_except_the_flagged_misprints():
    """Recomputed here: a mean of groups further from its group means than rounding allows must be a listed
    misprint, and every listed misprint must be one (DA-VPT's 41.73 for 41.07, 65.90 for 65.23, ...)."""
    rows = list(csv.DictReader(io.StringIO(REFERENCE_CSV.read_text())))
    off, flagged = set(), set()
    for line, r in enumerate(rows, start=2):
        if r["backbone"] == "vit_b16_in21k" or not r["avg_groups"]:
            continue
        groups = [Decimal(r[g]) for g in GROUPS]
        tolerance = Decimal("0.05") if min(-g.as_tuple().exponent for g in groups) == 1 else Decimal("0.005")
        tolerance += Decimal("0.05") if -Decimal(r["avg_groups"]).as_tuple().exponent == 1 else Decimal("0.005")
        if abs(Decimal(r["avg_groups"]) - sum(groups) / 3) > tolerance:
            off.add((line, r["method"]))
        if any(i.kind == "misprint" for i in issues_for(r["method"], r["source"], backbone=r["backbone"])):
            flagged.add((line, r["method"]))
    assert off == flagged and len(off) == 5
    note = " ".join(i.note for i in issues_for("vpt_deep", row("vpt_deep", "vit_b16_mae", "DA").source,
                                               backbone="vit_b16_mae"))  # fmt: skip
    assert "41.73" in note and "41.07" in note
    full = row("full", "vit_b16_mocov3", "DA-VPT")
    assert any("42.0" in i.note for i in issues_for("full", full.source, backbone="vit_b16_mocov3"))


def _edit(tmp_path, line: int, column: str, value: str, path=REFERENCE_CSV):
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows[line - 1][rows[0].index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    edited = tmp_path / path.name
    edited.write_text(out.getvalue())
    return edited


@pytest.mark.parametrize(
    ("path", "line", "column", "value", "message"),
    [
        (
            REFERENCE_CSV,
            7,
            "backbone",
            "vit_b16",
            r"line 7 \(vpt_deep\), column backbone: unknown backbone id 'vit_b16'; "
            r"use one of vit_b16_in21k, swin_b_in22k",
        ),
        (
            REFERENCE_CSV,
            7,
            "backbone",
            "swin_b_in22k",
            r"line 7 \(vpt_deep\), column backbone_weights: checkpoint "
            r"'orig_in21k' is not one of backbone swin_b_in22k's",
        ),
        (FGVC_REFERENCE_CSV, 3, "backbone", "", r"line 3 \(linear\), column backbone: unknown backbone id ''"),
        (REFERENCE_CSV, 1, "backbone", "arch", r"line 1: unknown column 'arch'"),
    ],
)
def test_a_bad_backbone_is_refused_in_one_line_naming_file_and_line(tmp_path, path, line, column, value, message):
    edited = _edit(tmp_path, line, column, value, path)
    with pytest.raises(ReferenceDataError) as e:
        load_reference(edited)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(edited)) and re.search(message, text), text


def test_an_unflagged_misprint_is_refused_and_the_same_row_on_two_backbones_is_not_a_repeat(tmp_path):
    line = 1 + next(i for i, (_, r) in enumerate(REFERENCE.frame.iterrows(), start=1)
                    if r.method == "full" and r.backbone == "vit_b16_mae")  # fmt: skip
    with pytest.raises(ReferenceDataError, match=r"column avg_groups: 65.00 is not the mean of the printed group"):
        load_reference(_edit(tmp_path, line, "avg_groups", "65.00"))
    # The same method and source on two backbones are two rows.
    text = REFERENCE_CSV.read_text()
    dup = next(x for x in text.splitlines() if x.startswith("full,") and ",vit_b16_mae,mae," in x)
    copy = tmp_path / "dup.csv"
    copy.write_text(text + dup.replace(",vit_b16_mae,mae,", ",vit_b16_mocov3,mocov3,") + "\n")
    assert len(load_reference(copy).rows("full", "vit_b16_mocov3")) == 2
    copy.write_text(text + dup + "\n")
    with pytest.raises(ReferenceDataError, match=r"repeats the method and source of line \d+ on the same backbone"):
        load_reference(copy)


# -- which rows a run is set beside -----------------------------------------------------------------------------
def test_a_run_is_compared_with_the_rows_of_its_recorded_backbone():
    assert run_backbone(VIT_B) == "vit_b16_in21k"
    assert run_backbone({**VIT_B, "backbone": "vit_base_patch16_224.augreg_in21k"}) == "vit_b16_in21k"
    assert run_backbone(SWIN) == "swin_b_in22k" and run_backbone(MAE) == "vit_b16_mae"
    assert run_backbone(MOCO) == "vit_b16_mocov3"
    assert run_backbone(DEMO) == "vit_b16_in21k"  # the demo's tiny ViT stands in for the default, marked
    assert run_backbone(TINY_SWIN) is None and run_backbone({"backbone": "swin_tiny_patch4_window7_224"}) is None
    assert run_backbone({}) == "vit_b16_in21k"  # a record without a backbone: the default, as before


def _runs(results, method, backbone, acc=60.0, seeds=(42, 44)):
    """Every task, two seeds, as the runner writes them; a file per backbone, so that runs on two backbones of one
    method sit side by side in one results directory."""
    tag = backbone["backbone"].replace(".", "_")
    for task in TASKS:
        for seed in seeds:
            write_run(results, method, task.id, seed, acc + (seed - 42) / 10, backbone=backbone)
            path = results / "runs" / method / task.id / f"grid-s{seed}.json"
            path.rename(path.with_name(f"grid-s{seed}-{tag}.json"))


def test_a_swin_run_is_never_set_beside_a_vit_row_nor_the_reverse(tmp_path, capsys):
    results = tmp_path / "r"
    _runs(results, "vpt_deep", SWIN, 70.0)
    _runs(results, "vpt_deep", VIT_B, 65.0)
    _runs(results, "e2vpt", MAE, 58.0)
    c = compare(results, REFERENCE)
    seen = {(b.variant.backbone, b.reference.backbone) for b in c.blocks}
    assert seen == {
        ("swin_b_in22k", "swin_b_in22k"),
        ("vit_b16_in21k", "vit_b16_in21k"),
        ("vit_b16_mae", "vit_b16_mae"),
    }
    swin = [b for b in c.blocks if b.variant.backbone == "swin_b_in22k"]
    assert [b.reference.source for b in swin] == list(REFERENCE.rows("vpt_deep", "swin_b_in22k").source)
    lines = swin[0].lines.set_index("row")
    assert lines.loc["avg_groups"].reported == 71.6 and lines.loc["avg_groups"].ours_mean == pytest.approx(70.1)
    assert lines.loc["natural"].backbone_match == "yes" and lines.loc["natural"].reported_backbone == "ms_in22k"
    assert lines.loc["cifar100"].note == "not printed by the source"
    mae = next(b for b in c.blocks if b.variant.backbone == "vit_b16_mae").lines.set_index("row")
    assert "DA-VPT prints the mean of groups" not in mae.loc["avg_groups"].note  # e2vpt's row has no misprint
    assert len([b for b in c.blocks if b.variant.backbone == "vit_b16_in21k"]) == len(
        REFERENCE.rows("vpt_deep", "vit_b16_in21k")
    )
    # Through the command: the CSV never pairs a Swin run with a ViT row.
    assert main(["compare", "--results", str(results)]) == 0
    table = pd.read_csv(results / "compare.csv")
    other = set(REFERENCE.frame[REFERENCE.frame.backbone != "vit_b16_in21k"].source)
    assert set(table[table.ours_backbone.str.startswith("swin")].source_full) <= other
    assert not set(table[table.ours_backbone == "vit_base_patch16_224.orig_in21k"].source_full) & other
    assert "Swin-B (IN-22k)" in (results / "compare.md").read_text()


def test_a_misprint_is_flagged_beside_the_number(tmp_path):
    results = tmp_path / "r"
    _runs(results, "vpt_deep", MOCO, 66.0)
    (block,) = compare(results, REFERENCE, sources=["DA-VPT"]).blocks
    line = block.lines.set_index("row").loc["avg_groups"]
    assert line.reported == 65.90 and "65.23" in line.note and line.backbone_match == "yes"


def test_a_backbone_no_row_uses_is_compared_with_nothing_in_one_line(tmp_path, capsys):
    results = tmp_path / "r"
    _runs(results, "linear", TINY_SWIN)
    capsys.readouterr()
    assert main(["compare", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    said = [x for x in out.splitlines() if "compared with nothing" in x]
    assert len(said) == 1 and "peft_bench_tiny_swin" in said[0] and said[0].startswith("linear [")
    assert pd.read_csv(results / "compare.csv").empty
    assert "no reported numbers for" not in out


def test_the_leaderboard_lists_only_the_rows_of_the_runs_backbones(tmp_path):
    results = tmp_path / "r"
    _runs(results, "vpt_deep", VIT_B)
    assert main(["leaderboard", "--results", str(results), "--reported"]) == 0
    board = pd.read_csv(results / "leaderboard.csv")
    assert len(board[board.kind == "reported"]) == len(REFERENCE.rows("vpt_deep", "vit_b16_in21k"))
    assert not board.source.fillna("").str.contains("Swin|MAE|MoCo").any()
    _runs(results, "vpt_deep", SWIN)
    assert main(["leaderboard", "--results", str(results), "--reported"]) == 0
    board = pd.read_csv(results / "leaderboard.csv")
    assert len(board[board.kind == "reported"]) == len(REFERENCE.rows("vpt_deep", "vit_b16_in21k")) + 1
    assert board.source.fillna("").str.endswith("[Swin-B (IN-22k)]").sum() == 1
    assert "not on ViT-B/16 (IN-21k)" in (results / "leaderboard.md").read_text()


# -- compare --table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "run", "method", "rows"),
    [
        ("vpt-swin", SWIN, "vpt_deep", ["Full", "Linear", "Mlp-3 (SNELL T3)", "VPT-Shallow", "VPT-Deep", "Adapter-8 (SNELL T3)",
                                        "LoRA-8 (SNELL T3)", "RepAdapter (HyperAdapter T3)"]),
        ("vpt-mae", MAE, "vpt_deep", ["Full", "Linear", "Partial-1", "Bias", "VPT-Shallow", "VPT-Deep"]),
        ("vpt-mocov3", MOCO, "vpt_shallow", ["Full", "Linear", "Bias", "VPT-Shallow", "VPT-Deep"]),
        ("e2vpt-mae", MAE, "e2vpt", ["Full", "VPT-Shallow", "VPT-Deep", "E2VPT", "Adapter-8 (SNELL T2)",
                                     "LoRA-8 (SNELL T2)"]),
        ("e2vpt-mocov3", MOCO, "e2vpt", ["Full", "VPT-Shallow", "VPT-Deep", "E2VPT", "Adapter-8 (SNELL T2)",
                                         "LoRA-8 (SNELL T2)"]),
    ],
)  # fmt: skip
def test_compare_table_shows_the_other_backbones_rows_with_ours_on_that_backbone_only(
    tmp_path, capsys, key, run, method, rows
):
    results = tmp_path / "r"
    _runs(results, method, run, 60.0)
    _runs(results, method, VIT_B, 90.0)  # another backbone: never in this table
    capsys.readouterr()
    assert main(["compare", "--results", str(results), "--table", key]) == 0
    out = capsys.readouterr().out
    view = pd.read_csv(results / f"compare-{key}.csv")
    vtab = view[view.suite == "vtab1k"] if "suite" in view else view
    assert list(dict.fromkeys(vtab.row)) == rows
    reported = vtab[vtab.side == "reported"].set_index("row")
    backbone = run_backbone(run)
    own = REFERENCE.frame[REFERENCE.frame.backbone == backbone]
    assert set(reported.natural) <= set(own.natural) and set(reported.avg_groups.dropna()) <= set(own.avg_groups)
    ours = vtab[(vtab.side == "ours") & (vtab.who == method)]
    assert len(ours) == 1 and ours.iloc[0].natural == pytest.approx(60.1)  # the 90.0 runs are not shown
    assert f"Backbone: {REFERENCE_BACKBONES[backbone][0]}" in out
    if key.endswith(("mae", "mocov3")):
        fgvc = view[(view.suite == "fgvc") & (view.side == "reported")]
        assert list(fgvc.row) == ["Full", "VPT-Shallow", "VPT-Deep"] and fgvc["mean"].notna().all()
    # The ViT-B/16 IN-21k tables never show the run on the other backbone.
    vit = "e2vpt" if method == "e2vpt" else "vpt"
    assert main(["compare", "--results", str(results), "--table", vit]) == 0
    vpt = pd.read_csv(results / f"compare-{vit}.csv")
    mine = vpt[(vpt.side == "ours") & (vpt.who == method) & (vpt.suite == "vtab1k")]
    assert len(mine) == 1 and mine.natural.iloc[0] == pytest.approx(90.1)


def test_the_mae_table_flags_the_printed_mean_that_its_group_means_contradict(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert main(["compare", "--results", str(tmp_path), "--table", "vpt-mae"]) == 0
    view = pd.read_csv(tmp_path / "compare-vpt-mae.csv")
    deep = view[(view.side == "reported") & (view.row == "VPT-Deep") & (view.suite == "vtab1k")].iloc[0]
    assert deep.avg_groups == 41.73 and "41.07" in deep.why
