"""`compare --table`: our rows laid out as a paper's VTAB-1k table, the paper's numbers beside them."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.papers.reference import load_reference
from benchmark.report.compare_table import get_table, load_tables, table_view
from tasks import TASKS
from tests.test_compare import write_run

REFERENCE = load_reference()
# The Convpass table's methods the suite runs (`lora` and `adapter` are the table baselines, keyed by name).
CONVPASS_METHODS = ("full", "linear", "vpt_deep", "adapter", "lora", "peft_lora", "convpass_attn", "convpass")


def synthetic_results(results, methods, *, seeds=(42, 44), protocol="final") -> None:
    for i, method in enumerate(methods):
        for task in TASKS:
            for seed in seeds:
                write_run(results, method, task.id, seed, 50.0 + i + (seed - 42) / 10, protocol=protocol)


def test_every_table_row_names_exactly_one_reference_row_and_known_columns():
    tables = load_tables()
    assert sorted(tables) == ["convpass", "e2vpt", "e2vpt-mae", "e2vpt-mocov3", "vpt", "vpt-mae", "vpt-mocov3",
                              "vpt-swin"]  # fmt: skip
    for table in tables.values():
        view = table_view_on_nothing(table)
        assert list(view[view.side == "reported"].row) == [r.label for r in table.rows]


def table_view_on_nothing(table):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "runs").mkdir()
        return table_view(Path(tmp), REFERENCE, table)


def test_convpass_table_shows_our_rows_beside_the_papers(tmp_path, capsys):
    results = tmp_path / "results"
    synthetic_results(results, CONVPASS_METHODS)
    capsys.readouterr()
    assert main(["compare", "--results", str(results), "--table", "convpass"]) == 0
    out = capsys.readouterr().out
    view = pd.read_csv(results / "compare-convpass.csv")
    md = (results / "compare-convpass.md").read_text()
    assert md in out and "Convpass (Jie & Deng" in md
    # The paper's order and columns: 19 tasks then the mean of groups, params first.
    table = get_table("convpass")
    assert table.columns[0] == "params_m" and table.columns[-1] == "avg_groups" and len(table.columns) == 21
    header = md.splitlines()[6]
    assert (
        header.index("params (M)")
        < header.index("cifar100")
        < header.index("smallnorb_ele")
        < header.index("avg (groups)")
    )
    assert list(dict.fromkeys(view.row)) == [
        "Full",
        "Linear",
        "VPT-Deep",
        "Adapter",
        "LoRA",
        "Convpass-attn",
        "Convpass",
    ]
    # Reported beside ours, per row; LoRA's row carries both suite methods that run it.
    lora = view[view.row == "LoRA"]
    assert list(lora.side) == ["reported", "ours", "ours"] and list(lora.who)[1:] == ["lora", "peft_lora"]
    assert lora.iloc[0].cifar100 == 67.1 and lora.iloc[0].mark == "†"  # NOAH: best test accuracy
    ours = lora.iloc[1]
    assert ours.cifar100 == pytest.approx(50.0 + 4 + 0.1) and ours.cifar100_n == 2
    assert ours.avg_groups == pytest.approx(54.1) and ours.params_m == pytest.approx(0.09216, abs=1e-4)
    assert ours.protocol == "fixed-hparams-last-epoch-2seeds" and ours.mark == "⚠"
    assert "protocol fixed-hparams-last-epoch-2seeds vs best-test-every-epoch-1seed" in ours.why
    # Test-selected reported rows are marked, val-tuned ones are not.
    marks = view[view.side == "reported"].set_index("row").mark.fillna("")
    assert marks.to_dict() == {"Full": "", "Linear": "", "VPT-Deep": "", "Adapter": "†", "LoRA": "†",
                               "Convpass-attn": "†", "Convpass": "†"}  # fmt: skip
    assert "ours: `convpass` ⚠" in md and "reported (JieShibo/PETL-ViT) †" in md
    assert "Rows of the paper's table the suite has no method for: NOAH." in md


def test_missing_methods_and_incomplete_groups_show_as_such(tmp_path):
    results = tmp_path / "results"
    write_run(results, "vpt_deep", "cifar100", 42, 70.0, protocol="grid")
    view = table_view(results, REFERENCE, get_table("e2vpt")).set_index(["row", "side", "who"])
    assert view.loc[("E2VPT", "ours", "e2vpt")].protocol == "no results"
    deep = view.loc[("VPT-Deep", "ours", "vpt_deep")]
    assert pd.isna(deep.natural) and deep.protocol == "val-tuned-last-epoch-1seed"
    assert view.loc[("VPT-Deep", "reported", "VPT paper via V-PETL Bench README")].natural == 78.48


def test_unknown_table_is_one_line_exit_2(tmp_path, capsys):
    synthetic_results(tmp_path, ("linear",), seeds=(42,))
    assert main(["compare", "--results", str(tmp_path), "--table", "noah"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unknown paper table 'noah'; pick one of convpass, e2vpt, e2vpt-mae, e2vpt-mocov3, vpt, "
        "vpt-mae, vpt-mocov3, vpt-swin"
    )
    assert not list(tmp_path.glob("compare-*"))
