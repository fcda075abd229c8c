"""`compare` on result files written in the runner's format, the leaderboard's reported rows and overlay."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.papers.reference import REFERENCE_CSV, load_reference
from benchmark.report.compare import backbone_identity, compare
from benchmark.report.compare_report import markdown
from benchmark.report.leaderboard import leaderboard_frame, plot, runs_frame, write_leaderboard
from methods import list_methods
from tasks import TASKS, get_task

REFERENCE = load_reference()
# Per-seed offsets around a chosen mean: sample std sqrt(2.5) = 1.5811.
OFFSETS = (-2.0, -1.0, 0.0, 1.0, 2.0)
SEEDS = (42, 44, 82, 100, 800)
STD = float(np.std(OFFSETS, ddof=1))
VIT_B = {"backbone": "vit_base_patch16_224.orig_in21k", "pretrained": True, "weights": None, "image_size": 224}
DEMO = {"backbone": "peft_bench_demo_vit", "pretrained": True, "weights": "/w/peft_bench_demo_vit.safetensors",
        "image_size": 32}  # fmt: skip


def write_run(results: Path, method: str, task: str, seed: int, acc: float | None, *, protocol: str = "grid",
              epochs: int = 100, backbone: dict | None = None, budget: str = "full", status: str = "ok") -> None:  # fmt: skip
    """One reported run as `benchmark.run.runner.execute` writes it (the fields compare and the leaderboard read)."""
    config = {"method": method, "task": task, "seed": seed, "protocol": protocol, "mode": "final",
              "method_config": {"recipe": {"lr": 0.1, "weight_decay": 0.0, "epochs": epochs}}, **(backbone or VIT_B)}  # fmt: skip
    if budget != "full":
        config["budget"] = budget
    record = {
        "schema": 1, "method": method, "task": task, "group": get_task(task).group, "seed": seed,
        "protocol": protocol, "mode": "final", "status": status, "error": None if status == "ok" else "boom",
        "test_acc": acc if status == "ok" else None, "val_acc": None,
        "params": {"tunable": 92160, "head": 7690, "backbone": 85798656, "nonzero_tunable": 92160},
        "config": config,
        "selection": {"lr": 0.1, "weight_decay": 0.0, "grid": [[lr, wd, 50.0] for lr in (0.1, 0.2, 0.3)
                                                               for wd in (0.0, 0.01)]} if protocol == "grid" else None,
        "pruning": None,
    }  # fmt: skip
    path = results / "runs" / method / task / f"{protocol}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def reported(method: str, source: str) -> pd.Series:
    rows = REFERENCE.rows(method)
    return rows[rows.source.str.contains(source, regex=False)].iloc[0]


def write_around_reference(results: Path, method: str, source: str, delta: dict[str, float], **kwargs) -> None:
    """Five seeds per task: the reported cell + the task's delta + OFFSETS."""
    ref = reported(method, source)
    for task in TASKS:
        for seed, offset in zip(SEEDS, OFFSETS, strict=True):
            write_run(results, method, task.id, seed, ref[task.id] + delta.get(task.id, 0.0) + offset, **kwargs)


def lines_of(c, source: str) -> pd.DataFrame:
    block = next(b for b in c.blocks if source in b.reference.source)
    return block.lines.set_index("row")


def test_differences_spread_and_matching_protocols(tmp_path):
    results = tmp_path / "r"
    delta = {"cifar100": 1.0, "dtd": -3.0, "svhn": STD}  # within, outside, exactly on the bound
    write_around_reference(results, "vpt_deep", "V-PETL", delta)
    c = compare(results, REFERENCE, sources=["V-PETL"])
    assert [b.reference.source for b in c.blocks] == [reported("vpt_deep", "V-PETL").source]
    lines = lines_of(c, "V-PETL")
    assert len(lines) == 19 + 5
    ref = reported("vpt_deep", "V-PETL")
    for task in ("cifar100", "dtd", "svhn", "kitti"):
        line = lines.loc[task]
        assert line.ours_mean == pytest.approx(ref[task] + delta.get(task, 0.0))
        assert line.ours_std == pytest.approx(STD) and line.ours_seeds == 5
        assert line["diff"] == pytest.approx(delta.get(task, 0.0), abs=1e-9)
    assert lines.loc["cifar100"].within_spread == "yes" and lines.loc["dtd"].within_spread == "no"
    assert lines.loc["kitti"].within_spread == "yes"
    # Group means: the mean of our task means, against the printed group mean (the published 78.48 here).
    natural = [t.id for t in TASKS if t.group == "natural"]
    expected = np.mean([ref[t] + delta.get(t, 0.0) for t in natural])
    assert lines.loc["natural"].ours_mean == pytest.approx(expected)
    assert lines.loc["natural"]["diff"] == pytest.approx(expected - 78.48)
    # Per-seed group means move together (same offset for every task), so their std is the task std.
    assert lines.loc["natural"].ours_std == pytest.approx(STD)
    assert lines.loc["avg_19"].reported == 69.43 and lines.loc["avg_groups"].reported == 71.96
    assert lines.loc["avg_19"].ours_mean == pytest.approx(
        np.mean([ref[t.id] for t in TASKS]) + sum(delta.values()) / 19
    )
    assert set(lines.ours_protocol) == {"val-tuned-last-epoch-5seeds"}
    assert set(lines.reported_protocol) == {"val-tuned-last-epoch-5seeds"}
    assert set(lines.protocols_match) == {"yes"} and set(lines.backbone_match) == {"yes"}
    assert set(lines.mismatch) == {""}
    assert "printed 78.48; its cells give 78.49" in lines.loc["natural"].note
    md = markdown(c)
    assert "⚠" not in md.split("## Summary")[1].split("## vpt_deep")[0]
    assert "| **natural**" in md and "val-tuned-last-epoch-5seeds" in md and "natural 78.48 (cells: 78.49)" in md


def test_differing_protocol_backbone_and_epochs_are_marked_never_silent(tmp_path):
    results = tmp_path / "r"
    write_around_reference(results, "vpt_deep", "V-PETL", {}, protocol="final", epochs=30, backbone=DEMO)
    c = compare(results, REFERENCE, sources=["V-PETL"])
    lines = lines_of(c, "V-PETL")
    assert set(lines.ours_protocol) == {"fixed-hparams-last-epoch-5seeds"}
    assert set(lines.protocols_match) == {"no"} and set(lines.backbone_match) == {"no"}
    mismatch = lines.loc["dtd"].mismatch
    assert "protocol fixed-hparams-last-epoch-5seeds vs val-tuned-last-epoch-5seeds" in mismatch
    assert (
        "30 epochs vs 100" in mismatch and "backbone peft_bench_demo_vit" in mismatch and "vs orig_in21k" in mismatch
    )
    # The numbers are still computed, and the marking sits beside them.
    assert lines.loc["dtd"]["diff"] == pytest.approx(0.0, abs=1e-9) and lines.loc["dtd"].within_spread == "yes"
    md = markdown(c)
    assert (
        "⚠ Not like for like on any row: protocol fixed-hparams-last-epoch-5seeds vs val-tuned-last-epoch-5seeds" in md
    )
    assert "| no ⚠" in md
    assert len(re.findall(r"\| ⚠ +\|", md)) == 1 + 24  # the marker column: its header, then every line


def test_quick_budget_never_matches_even_a_one_seed_protocol(tmp_path):
    ref = reported("vpt_deep", "PETL_Vision")  # val-tuned-last-epoch-1seed, averages only
    assert ref.selection_protocol == "val-tuned-last-epoch-1seed"
    for budget in ("full", "quick"):
        results = tmp_path / budget
        for task in TASKS:
            write_run(results, "vpt_deep", task.id, 42, 70.0, budget=budget)
        lines = lines_of(compare(results, REFERENCE, sources=["PETL_Vision"]), "PETL_Vision")
        assert lines.loc["avg_19"].ours_mean == 70.0 and lines.loc["avg_19"]["diff"] == pytest.approx(70 - 72.02)
        assert lines.loc["avg_19"].within_spread == "n/a"  # one seed: no spread
        assert lines.loc["cifar100"].note == "not printed by the source" and pd.isna(lines.loc["cifar100"]["diff"])
        if budget == "full":
            assert lines.loc["avg_19"].ours_protocol == "val-tuned-last-epoch-1seed"
            assert lines.loc["avg_19"].protocols_match == "yes"
        else:
            assert lines.loc["avg_19"].ours_protocol == "val-tuned-last-epoch-1seed (quick budget)"
            assert lines.loc["avg_19"].protocols_match == "no" and "quick budget" in lines.loc["avg_19"].mismatch


def test_missing_tasks_failed_runs_and_incomplete_groups(tmp_path):
    results = tmp_path / "r"
    for seed in (42, 44):
        write_run(results, "convpass", "svhn", seed, 90.0 + seed % 3)
        write_run(results, "convpass", "eurosat", seed, None, status="failed")
    lines = lines_of(compare(results, REFERENCE, methods=["convpass"]), "JieShibo")
    assert lines.loc["svhn"].ours_seeds == 2 and lines.loc["svhn"].ours_protocol == "val-tuned-last-epoch-2seeds"
    assert (
        lines.loc["eurosat"].note == "every run of ours failed" and lines.loc["eurosat"].ours_protocol == "no result"
    )
    assert lines.loc["dtd"].note == "no result of ours"
    assert lines.loc["natural"].ours_protocol == "incomplete" and pd.isna(lines.loc["natural"].ours_mean)
    assert "ours covers 1/7 of its tasks" in lines.loc["natural"].note
    # Every reported line is there with its protocol label, ours or not.
    assert set(lines.reported_protocol) == {"best-test-every10-1seed"} and lines.reported.notna().all()


def demo_like(results: Path) -> None:
    """What `make demo` writes: every method, four tasks, two seeds, the final protocol, the demo backbone."""
    for method in list_methods():
        for task in ("svhn", "eurosat", "clevr_count", "dsprites_ori"):
            for seed in (42, 44):
                write_run(results, method, task, seed, 40.0 + seed / 10, protocol="final", epochs=30, backbone=DEMO)


def test_compare_on_demo_like_results_lists_every_reported_row_with_its_protocol(tmp_path, capsys):
    results = tmp_path / "demo"
    demo_like(results)
    assert main(["compare", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    unreported = ", ".join(m for m in list_methods() if REFERENCE.rows(m).empty)
    assert "NOT like for like" in out and f"no reported numbers for: {unreported}" in out
    table = pd.read_csv(results / "compare.csv")
    md = (results / "compare.md").read_text()
    # The demo's tiny ViT stands in for the default backbone: only the ViT-B/16 IN-21k rows, never another backbone's.
    frame = REFERENCE.frame
    reference = frame[frame.method.isin(list_methods()) & (frame.backbone == "vit_b16_in21k")]
    assert len(reference) == 41  # the rows of the 27 methods that have some
    assert not set(table.source_full) & set(frame[frame.backbone != "vit_b16_in21k"].source)
    for _, ref in reference.iterrows():
        rows = table[(table.method == ref.method) & (table.source_full == ref.source)]
        assert len(rows) == 24 and set(rows.reported_protocol) == {ref.selection_protocol}, ref.source
        assert set(rows.ours_protocol) <= {"fixed-hparams-last-epoch-2seeds", "no result", "incomplete"}
        assert f"- source: {ref.source}" in md
    assert set(table.protocols_match.dropna()) == {"no"} and set(table.backbone_match.dropna()) == {"no"}
    assert f"No reported VTAB-1k numbers exist for {unreported}" in md
    assert "## lion: ours fixed-hparams-last-epoch-2seeds" in md
    # Written atomically: no temporary files left behind.
    assert not list(results.glob(".*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], r"unknown method 'nope'; known methods: "),
        (["--method", "linear,vpt_deep"], r"no results for vpt_deep in .* \(it has results for convpass, linear"),
        (
            ["--source", "nowhere"],
            r"no reference row of convpass, linear has a source containing 'nowhere'; "
            r"their sources: ",
        ),
        (["--results", "{tmp}/empty"], r"no results in .*empty \(expected .*runs\); run `python -m benchmark bench`"),
        (["--results", "{tmp}/tune-only"], r"no test-split results in .*tune-only"),
    ],
)
def test_bad_compare_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    results = tmp_path / "r"
    write_run(results, "linear", "svhn", 42, 50.0)
    write_run(results, "convpass", "svhn", 42, 50.0)
    tune = tmp_path / "tune-only" / "runs" / "linear" / "svhn"
    tune.mkdir(parents=True)
    (tune / "tune-s42.json").write_text(
        json.dumps({"schema": 1, "mode": "tune", "method": "linear", "task": "svhn", "seed": 42, "protocol": "tune",
                    "status": "ok", "val_acc": 50.0, "config": {},
                    "params": {"tunable": 0, "head": 7690, "backbone": 85798656, "nonzero_tunable": 0}})
    )  # fmt: skip
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    capsys.readouterr()
    assert main(["compare", "--results", str(results), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and re.search(message, err), err
    assert not (results / "compare.md").exists() and not (results / "compare.csv").exists()


def test_backbone_identity():
    assert backbone_identity(VIT_B) == ("orig_in21k", "vit_base_patch16_224.orig_in21k")
    augreg = {**VIT_B, "backbone": "vit_base_patch16_224.augreg_in21k"}
    assert backbone_identity(augreg)[0] == "augreg_in21k"
    npz = {**VIT_B, "backbone": "vit_base_patch16_224", "weights": "/data/ViT-B_16.npz"}
    assert backbone_identity(npz) == ("orig_in21k", "vit_base_patch16_224 (ViT-B_16.npz)")
    assert backbone_identity({**VIT_B, "pretrained": False}) == (None, "vit_base_patch16_224.orig_in21k (random init)")
    assert backbone_identity({**VIT_B, "image_size": 384})[0] is None
    assert backbone_identity(DEMO)[0] is None


# -- the leaderboard with the reported rows ------------------------------------------------------------------
def test_leaderboard_reported_rows_and_overlay(tmp_path, capsys):
    results = tmp_path / "demo"
    demo_like(results)
    assert main(["leaderboard", "--results", str(results)]) == 0
    plain_md, plain_png = (results / "leaderboard.md").read_text(), (results / "accuracy_vs_params.png").read_bytes()
    assert "| kind" not in plain_md and "reported" not in pd.read_csv(results / "leaderboard.csv").columns
    assert main(["leaderboard", "--results", str(results), "--reported"]) == 0
    md = (results / "leaderboard.md").read_text()
    board = pd.read_csv(results / "leaderboard.csv")
    ours, theirs = board[board.kind == "ours"], board[board.kind == "reported"]
    assert len(ours) == len(list_methods()) and set(ours.source.fillna("")) == {""}
    assert len(theirs) == 41 and set(theirs.method) <= set(list_methods())
    vpt = theirs[(theirs.method == "vpt_deep") & (theirs.source == "VPT paper via NOAH paper Table 1")].iloc[0]
    assert (vpt.protocol, vpt.avg_tasks_mean, vpt.avg_groups_mean, vpt.tunable) == (
        "val-tuned-last-epoch-5seeds", 69.43, 71.96, 640000.0)  # fmt: skip
    assert re.search(
        r"\| reported +\| vpt_deep +\| val-tuned-last-epoch-5seeds +\| VPT paper via NOAH paper Table 1", md
    )
    assert "## Sources of the reported rows" in md and "Rows of kind `reported` are published numbers" in md
    png = (results / "accuracy_vs_params.png").read_bytes()
    assert png[:4] == b"\x89PNG" and png != plain_png
    assert main(["leaderboard", "--results", str(results), "--reported", "all"]) == 0
    # Every row of the backbone the demo stands in for; none of another backbone's.
    default = REFERENCE.frame[REFERENCE.frame.backbone == "vit_b16_in21k"]
    assert len(pd.read_csv(results / "leaderboard.csv").query("kind == 'reported'")) == len(default)


def test_overlay_draws_the_papers_rows_as_hollow_unlabelled_markers(monkeypatch):
    import matplotlib.axes

    drawn, labels = [], []
    original_scatter, original_annotate = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.annotate

    def scatter(self, *args, **kwargs):
        drawn.append(kwargs.get("facecolors"))
        return original_scatter(self, *args, **kwargs)

    def annotate(self, text, *args, **kwargs):
        labels.append(text)
        return original_annotate(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", annotate)
    from benchmark.report.leaderboard import with_reported

    board = leaderboard_frame(runs_frame([]))
    png = plot(with_reported(board, REFERENCE, "all"))
    placed = REFERENCE.frame.dropna(subset=["avg_19", "params_m"]).query("params_m > 0")
    assert png[:4] == b"\x89PNG" and drawn.count("none") == len(placed) > 0
    # The papers' rows are never labelled (the page's tooltip names each source): with no rows of ours, no labels.
    assert labels == []


def test_quick_budget_is_labelled_in_the_leaderboard(tmp_path):
    results = tmp_path / "r"
    write_run(results, "linear", "svhn", 42, 50.0, budget="quick")
    write_run(results, "vpt_deep", "svhn", 42, 50.0)
    board = write_leaderboard(results)
    assert dict(zip(board.method, board.protocol, strict=True)) == {
        "linear": "val-tuned-last-epoch-1seed (quick budget)",
        "vpt_deep": "val-tuned-last-epoch-1seed",
    }
    assert "val-tuned-last-epoch-1seed (quick budget)" in (results / "leaderboard.md").read_text()


def test_a_bad_reference_stops_compare_and_leaderboard_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(REFERENCE_CSV.read_text().replace(",78.1,49.6,", ',"78,1",49.6,', 1))
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    for args in (
        ["compare", "--results", str(results), "--reference", str(bad)],
        ["leaderboard", "--results", str(results), "--reported", "--reference", str(bad)],
        ["compare", "--results", str(results), "--reference", str(tmp_path / "missing.csv")],
    ):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert "column svhn: '78,1' is not a number" in err or "missing.csv does not exist" in err
    assert [p.name for p in results.iterdir()] == ["runs"]


def test_an_unlisted_rounding_difference_is_shown_not_hidden(tmp_path):
    """A mean within rounding of its cells but not explained by KNOWN_ISSUES loads, and compare says so."""
    custom = tmp_path / "reported.csv"
    # Convpass's cells have two decimals: 76.55 is within 0.01 of their mean of groups (76.5574), yet not equal.
    custom.write_text(REFERENCE_CSV.read_text().replace(",81.69,85.31,62.68,76.56,", ",81.69,85.31,62.68,76.55,"))
    reference = load_reference(custom)
    (d,) = [d for d in reference.discrepancies if d.method == "convpass"]
    assert (d.column, str(d.value), str(d.rounded), d.issue) == ("avg_groups", "76.55", "76.56", None)
    results = tmp_path / "r"
    write_run(results, "convpass", "svhn", 42, 90.0)
    md = markdown(compare(results, reference, sources=["JieShibo"]))
    assert "- convpass, JieShibo/PETL-ViT: avg_groups 76.55 (cells: 76.56). Not explained by a known issue." in md


def test_reported_rows_on_an_empty_results_directory(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert main(["leaderboard", "--results", str(tmp_path), "--reported"]) == 0
    assert "(no results)" in capsys.readouterr().out
    assert main(["leaderboard", "--results", str(tmp_path), "--reported", "all"]) == 0
    # No runs: the default backbone's rows (another backbone's rows come only with runs on it).
    assert len(pd.read_csv(tmp_path / "leaderboard.csv")) == (REFERENCE.frame.backbone == "vit_b16_in21k").sum()
