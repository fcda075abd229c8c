"""`reproduce`: the plans follow the specs (grids, seeds, per-task settings, costs); a quick run end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import methods
from benchmark.cli import main
from benchmark.core.errors import UserError
from benchmark.papers.protocols import PAPER_PROTOCOLS, plan_reproduction, reproducible_methods
from benchmark.papers.reference import load_reference
from benchmark.run.runner import RunSpec, Settings
from tasks import TASKS, get_task
from tests.conftest import TINY_ARGS

REFERENCE = load_reference()
README = Path(__file__).resolve().parent.parent / "README.md"
# The specs' grids, written out independently of the code: base lr per 256 images, and weight decays.
SPEC_VPT_BASE = [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]
SPEC_FULL_BASE = [0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 5e-4, 1e-4]
SPEC_WDS = [0.01, 0.001, 0.0001, 0.0]
# docs/methods/prompts.md: the confirmed per-task batch sizes (128 for svhn and sun397, else 64).
VPT_BATCH_128 = {"svhn", "sun397"}
# docs/methods/prompts.md: pre-pruning prompt length P per task; rewind pairs per P (|T| × |S|, |S| = 8).
E2VPT_P = {"cifar100": 5, "caltech101": 32, "flowers102": 1, "dsprites_loc": 5, "dsprites_ori": 5}
E2VPT_PAIRS = {1: 8, 5: 40, 10: 72, 32: 72}


def plan(method: str, budget: str = "full", tasks: str = "all", **kwargs):
    from tasks import parse_tasks

    return plan_reproduction(methods.get_method(method)(), budget, parse_tasks(tasks), REFERENCE, **kwargs)


def test_reproducible_methods_are_the_registered_ones_with_a_protocol():
    registered = set(methods.list_methods())
    assert reproducible_methods(REFERENCE) == sorted(registered & set(PAPER_PROTOCOLS))
    assert registered - set(PAPER_PROTOCOLS) == {"lion", "pgn"}
    # The table baselines are keyed by name, whichever branch registers them.
    baselines = {
        "lora",
        "adapter",
        "adapter_houlsby",
        "adaptformer",
        "bitfit",
        "ssf",
        "fact_tt",
        "fact_tk",
        "repadapter",
    }
    assert baselines <= set(PAPER_PROTOCOLS)
    for name in baselines:  # each one's reported rows are in the reference file under that name
        assert not REFERENCE.rows(name).empty, name
    assert {PAPER_PROTOCOLS[m].protocol for m in ("lora", "adapter", "fact_tt", "fact_tk", "repadapter")} == {"final"}


@pytest.mark.parametrize("method", ["peft", "peft_lora", "peft_vera"])
def test_peft_tuners_reproduce_the_suite_grid_with_the_suite_seeds(method):
    p = plan(method, tasks="dtd")
    assert p.protocol.protocol == "grid" and p.seeds == (42, 44, 82, 100, 800)
    recipe = p.tasks[0].config.recipe
    assert recipe.optimizer == "adamw" and recipe.lr_grid == (1e-2, 1e-3) and recipe.wd_grid == (1e-4, 1e-3)
    assert p.tasks[0].grid_runs == 4 and REFERENCE.rows(method).empty
    quick = plan(method, tasks="dtd", budget="quick")
    assert quick.seeds == (42,) and quick.tasks[0].grid_runs == 2


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "e2vpt", "linear", "full"])
def test_full_budget_runs_the_specs_grid_and_the_papers_seeds(method):
    p = plan(method)
    assert p.protocol.protocol == "grid" and p.seeds == (42, 44, 82, 100, 800)
    assert p.label() == "val-tuned-last-epoch-5seeds"
    base = SPEC_FULL_BASE if method == "full" else SPEC_VPT_BASE
    for tp in p.tasks:
        recipe = tp.config.recipe
        batch = 128 if method.startswith("vpt") and tp.task.id in VPT_BATCH_128 else 64
        assert recipe.batch_size == batch and recipe.epochs == 100
        assert recipe.lr_grid == pytest.approx([b * batch / 256 for b in base])
        assert list(recipe.wd_grid) == SPEC_WDS
        assert tp.grid_runs == len(base) * 4
        # The method's own recipe already holds the spec's grid, so the reproduction and `bench --protocol
        # grid` are the same runs.
        own = methods.get_method(method)().for_task(tp.task.id).recipe
        assert own.lr_grid == pytest.approx(recipe.lr_grid) and own.wd_grid == recipe.wd_grid


def test_run_counts_and_cost_follow_the_specs():
    vpt = plan("vpt_deep")
    assert sum(tp.runs for tp in vpt.tasks) == 19 * (40 + 5) == 855
    assert sum(tp.train_images for tp in vpt.tasks) == 19 * (40 * 800 + 5 * 1000) * 100
    test_images = sum(t.test_size for t in TASKS)
    assert sum(tp.eval_images for tp in vpt.tasks) == 19 * 40 * 200 + 5 * test_images
    e2vpt = plan("e2vpt")
    for tp in e2vpt.tasks:
        pairs = E2VPT_PAIRS[E2VPT_P.get(tp.task.id, 10)]
        assert (tp.grid_runs, tp.dense_runs, tp.rewind_runs, len(tp.seeds)) == (40, 1, pairs, 5), tp.task.id
        assert tp.config.num_tokens == E2VPT_P.get(tp.task.id, 10)
    assert sum(tp.runs for tp in e2vpt.tasks) == 19 * 46 + 14 * 72 + 3 * 40 + 72 + 8 == 2082
    for method in ("convpass", "convpass_attn"):
        p = plan(method)
        assert p.protocol.protocol == "final" and p.label() == "fixed-hparams-last-epoch-5seeds"
        for tp in p.tasks:
            r = tp.config.recipe
            assert (tp.grid_runs, tp.runs, r.lr, r.weight_decay, r.optimizer) == (0, 5, 1e-3, 1e-4, "adamw")
        scale = {tp.task.id: tp.config.scale for tp in p.tasks}
        assert scale["svhn"] == 100 and scale["dtd"] == (0.01 if method == "convpass" else 0.1)
    linear = plan("linear")
    assert all(tp.frozen_features and tp.train_images == 0 for tp in linear.tasks)
    assert sum(tp.eval_images for tp in linear.tasks) == 19 * 2000 + test_images


def test_quick_budget_is_one_seed_a_small_grid_and_labelled():
    for method in reproducible_methods(REFERENCE):
        p = plan(method, "quick")
        assert p.seeds == (42,) and "(quick budget)" in p.label()
        for tp in p.tasks:
            if p.protocol.protocol == "grid":
                assert (len(tp.config.recipe.lr_grid), len(tp.config.recipe.wd_grid)) == (2, 1)
    e2vpt = plan("e2vpt", "quick", "dtd")
    assert e2vpt.options == {"max_token_levels": "3", "max_segment_levels": "2"}
    assert e2vpt.tasks[0].rewind_runs == 6 and e2vpt.tasks[0].runs == 2 + 1 + 6 + 1


def test_epochs_override_is_recorded_in_the_plan():
    p = plan("vpt_deep", tasks="dtd", epochs=3)
    assert p.tasks[0].config.recipe.epochs == 3 and p.task_overrides()["dtd"]["epochs"] == 3


def test_methods_without_a_protocol_are_refused_naming_those_with_one(capsys):
    with pytest.raises(UserError, match=r"lion has no published VTAB-1k protocol to reproduce; methods with one: "
                                        r"adapter, adapter_houlsby, .*, convpass, convpass_attn, difffit, e2vpt, .*, peft, peft_boft, .*vpt_shallow$"):  # fmt: skip
        plan("lion")
    for args in (["--method", "pgn"], ["--method", "nope"], ["--method", "vpt_deep", "--source", "nowhere"]):
        capsys.readouterr()
        assert main(["reproduce", "--plan", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no reference row of vpt_deep has a source containing 'nowhere'" in err


def test_a_bad_reference_stops_reproduce_before_anything_runs(tmp_path, capsys):
    from benchmark.papers.reference import REFERENCE_CSV

    bad = tmp_path / "bad.csv"
    bad.write_text(REFERENCE_CSV.read_text().replace("\ngps,", "\nGPS,"))
    results = tmp_path / "results"
    assert main(["reproduce", "--method", "vpt_deep", "--reference", str(bad), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: .*bad.csv, line 20 \(GPS\), column method: method 'GPS' is not a lower_snake name",
                        err), err  # fmt: skip
    assert not results.exists()


def test_plan_command_prints_the_runs(capsys):
    assert main(["reproduce", "--method", "vpt_deep", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "label val-tuned-last-epoch-5seeds" in out and "seeds 42, 44, 82, 100, 800" in out
    assert "total: 855 runs; 70,300,000 training images" in out and "37.0× one single-seed 19-task sweep" in out
    assert re.search(r"svhn +128 +100 +10×4 +25, 12.5, 5, 2.5", out)


def test_readme_cost_table_matches_the_plans():
    """The README's "Reproducing a paper" table states the counts the plans compute."""
    text = README.read_text()
    for method in reproducible_methods(REFERENCE):
        for budget in ("full", "quick"):
            p = plan(method, budget)
            frame = p.frame()
            if method.startswith("peft_"):  # one README row stands for the generic method and every tuner name
                assert frame.equals(plan("peft", budget).frame())
                continue
            runs, train = int(frame.runs.sum()), int(frame["train images"].sum())
            evaluate, grid = int(frame["eval images"].sum()), frame.grid.iloc[0]
            row = (f"| `{method}` | {budget} | {grid} | {len(p.seeds)} | {runs:,} | {train / 1e6:.1f}M | "
                   f"{evaluate / 1e6:.2f}M | {train / 1.9e6:.1f}× |")  # fmt: skip
            assert row in text, row


def test_budget_is_part_of_a_runs_identity_only_when_reduced():
    cfg = methods.get_method("linear")()
    full = RunSpec(cfg, get_task("svhn"), 42, "final", "final", Settings("test_vit"))
    quick = RunSpec(cfg, get_task("svhn"), 42, "final", "final", Settings("test_vit", budget="quick"))
    assert "budget" not in full.config_dict()  # results written before budgets existed keep their identity
    assert quick.config_dict()["budget"] == "quick"
    with pytest.raises(UserError, match="unknown budget 'huge'"):
        Settings("test_vit", budget="huge")


@pytest.mark.slow
def test_quick_reproduction_end_to_end_is_labelled_everywhere(synth_root, tmp_path, capsys):
    results = tmp_path / "repro"
    args = ["reproduce", "--method", "linear", "--budget", "quick", "--tasks", "camelyon,svhn",
            "--data-root", str(synth_root), "--results", str(results), "--epochs", "3", *TINY_ARGS]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 run(s) executed, 0 failed" in out and "NOT like for like" in out
    for task in ("camelyon", "svhn"):
        tune = sorted(p.name for p in (results / "runs/linear" / task / "grid-tune").glob("*.json"))
        assert tune == ["lr0.25-wd0.001.json", "lr6.25-wd0.001.json"]  # base 1 and 25 × 64/256
        final = json.loads((results / "runs/linear" / task / "grid-s42.json").read_text())
        assert final["status"] == "ok" and final["config"]["budget"] == "quick"
        assert final["config"]["method_config"]["recipe"]["epochs"] == 3
        assert final["selection"]["lr"] in (0.25, 6.25) and len(final["selection"]["grid"]) == 2
    assert "val-tuned-last-epoch-1seed (quick budget)" in (results / "leaderboard.md").read_text()
    table = pd.read_csv(results / "compare.csv")
    assert set(table.ours_protocol) == {"val-tuned-last-epoch-1seed (quick budget)", "no result", "incomplete"}
    assert set(table.ours_budget) == {"quick"} and len(table) == 3 * 24  # the three reported rows of linear
    svhn = table[(table.row == "svhn") & table.source.str.contains("V-PETL")].iloc[0]
    assert svhn.protocols_match == "no" and "quick budget" in svhn.mismatch and "3 epochs vs 100" in svhn.mismatch
    md = (results / "compare.md").read_text()
    assert "## linear: ours val-tuned-last-epoch-1seed (quick budget)" in md
    assert "grid 2×1 on train800 → val200" in md and "last epoch of 3, 1 seed (42); quick budget" in md
    # Running it again resumes: nothing is left to run.
    assert main(args) == 0
    assert "0 run(s) executed" in capsys.readouterr().out
