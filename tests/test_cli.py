"""The commands, end to end on synthetic data, and every bad input the foundation must refuse cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.report.leaderboard import write_leaderboard
from methods import list_methods, method_origin
from tests.conftest import E2E_TASKS, argv

TASKS_ARG = ",".join(E2E_TASKS)
FAST = ["--epochs", "8", "--batch-size", "32", "--seeds", "42,44"]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` with its modification time and content."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def bench(synth_root: Path, results: Path, *extra: str, method: str = "linear", tasks: str = TASKS_ARG) -> int:
    return main(
        argv(f"bench --method {method} --tasks {tasks} --data-root {synth_root} --results {results}", *FAST, *extra)
    )


def test_methods_and_tasks_commands(capsys):
    assert main(["methods"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list_methods()
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        len(out) == 21
        and out[0].startswith("VTAB-1k: 19 tasks")
        and out[2].split()[:3] == ["cifar100", "natural", "100"]
    )


def test_params_json_on_vit_b16(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--methods", "full,linear,lora", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"full", "linear", "lora"}
    assert {r["tunable"] for r in rows if r["method"] == "lora"} == {294_912}
    from tasks import TASKS

    by = {(r["method"], r["task"]): r for r in rows}
    for task in TASKS:
        full, linear = by[("full", task.id)], by[("linear", task.id)]
        assert full["tunable"] == 85_798_656 and full["nonzero_tunable"] == 85_798_656
        assert linear["tunable"] == 0 and linear["head"] == 769 * task.num_classes
        assert set(full) == {"method", "task", "tunable", "head", "backbone", "nonzero_tunable"}
        assert all(isinstance(v, int) for k, v in full.items() if k not in ("method", "task"))


@pytest.mark.slow
def test_bench_end_to_end_then_resume_changes_nothing(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    assert bench(synth_root, results) == 0
    assert bench(synth_root, results, "--lr", "0.01", method="full") == 0
    files = {p.name for p in results.iterdir()}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.html", "accuracy_vs_params.png", "runs"} <= files
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]
    assert len(records) == 2 * 2 * 2
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert r["protocol"] == "final" and r["val_acc"] is None and 0 <= r["test_acc"] <= 100
        assert len(r["train_loss"]) == 8 and r["wall_time_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["train_images_per_s"] > 0
        assert r["config"]["method_config"]["recipe"]["epochs"] == 8
        assert r["data"]["train_split"]["name"] == "train800val200" and r["data"]["eval_split"]["name"] == "test"
        assert {"git_commit", "versions", "device"} <= r["provenance"].keys()
        assert r["provenance"]["versions"]["torch"]
    linear = {(r["task"], r["seed"]): r["test_acc"] for r in records if r["method"] == "linear"}
    # svhn's classes are colours and stripes, which even random features separate linearly; camelyon's are
    # textures, which need pretrained features (the demo's backbone) and are not asserted here.
    assert min(v for (t, _), v in linear.items() if t == "svhn") > 50  # chance: 10
    board = (results / "leaderboard.md").read_text()
    assert "| linear" in board and "| full" in board and "fixed-hparams-last-epoch-2seeds" in board
    assert (results / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"

    before = snapshot(results)
    capsys.readouterr()
    assert bench(synth_root, results) == 0
    assert "0 run(s) executed" in capsys.readouterr().out
    assert snapshot(results) == before


def test_bench_sweeps_several_methods_with_one_leaderboard(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    assert bench(synth_root, results, "--seeds", "42", "--epochs", "2", method="linear,bitfit", tasks="svhn") == 0
    out = capsys.readouterr().out
    assert "2 run(s) executed, 0 failed" in out
    runs = sorted(str(p.relative_to(results / "runs")) for p in (results / "runs").rglob("*.json"))
    assert runs == ["bitfit/svhn/final-s42.json", "linear/svhn/final-s42.json"]
    board = (results / "leaderboard.md").read_text()
    assert "| linear" in board and "| bitfit" in board


def test_bench_checks_every_method_before_the_first_run(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    # linear would run first; lora has the option, linear does not: nothing may be written.
    assert bench(synth_root, results, "--set", "rank=4", method="linear,lora", tasks="svhn") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "linear on svhn: linear has no option 'rank'" in err, err
    assert not results.exists() or not any(results.rglob("*.json"))
    assert bench(synth_root, results, method="linear,nope", tasks="svhn") == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_protocol_selects_on_val200_and_records_the_choice(synth_root, tmp_path):
    results = tmp_path / "results"
    args = ["--protocol", "grid", "--lr-grid", "0.5,0.001", "--wd-grid", "0", "--seeds", "42"]
    assert bench(synth_root, results, *args, tasks="camelyon") == 0
    tune = sorted((results / "runs/linear/camelyon/grid-tune").glob("*.json"))
    assert [p.name for p in tune] == ["lr0.001-wd0.json", "lr0.5-wd0.json"]
    for p in tune:
        r = json.loads(p.read_text())
        assert r["mode"] == "tune" and r["test_acc"] is None and r["val_acc"] is not None
        assert r["data"]["eval_split"]["name"] == "val200"
    final = json.loads((results / "runs/linear/camelyon/grid-s42.json").read_text())
    best = max(
        (json.loads(p.read_text()) for p in tune),
        key=lambda r: (r["val_acc"], -r["config"]["method_config"]["recipe"]["lr"]),
    )
    assert final["selection"]["lr"] == best["config"]["method_config"]["recipe"]["lr"]
    assert final["config"]["method_config"]["recipe"]["lr"] == final["selection"]["lr"]
    assert final["data"]["eval_split"]["name"] == "test" and final["test_acc"] is not None
    assert "val-tuned-last-epoch-1seed" in (results / "leaderboard.md").read_text()
    before = snapshot(results)
    assert bench(synth_root, results, *args, tasks="camelyon") == 0  # resumes: nothing left to run
    assert snapshot(results) == before


def test_grid_tie_goes_to_smaller_lr_then_smaller_wd():
    from benchmark.sweep.graph import select_grid_point

    def rec(lr, wd, acc, status="ok"):
        return {
            "status": status,
            "val_acc": acc,
            "seed": 42,
            "config": {"method_config": {"recipe": {"lr": lr, "weight_decay": wd}}},
        }

    chosen = select_grid_point(
        [
            rec(0.1, 0.0, 90.0),
            rec(0.01, 0.01, 90.0),
            rec(0.01, 0.001, 90.0),
            rec(1.0, 0.0, 95.0, status="failed"),
            rec(0.5, 0.0, 80.0),
        ]
    )
    assert (chosen["lr"], chosen["weight_decay"]) == (0.01, 0.001)
    with pytest.raises(RuntimeError, match="every grid point failed"):
        select_grid_point([rec(0.1, 0.0, None, status="failed")])


@pytest.mark.slow
def test_run_command_and_tune_protocol(synth_root, tmp_path, capsys):
    out = tmp_path / "one.json"
    code = main(
        argv(
            f"run --method linear --task svhn --seed 3 --protocol tune --data-root {synth_root} --out {out} --epochs 3"
        )
    )
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert (r["status"], r["seed"], r["mode"], r["test_acc"]) == ("ok", 3, "tune", None)
    assert r["val_acc"] is not None and r["data"]["eval_split"]["name"] == "val200"
    assert "val200 accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    # A huge learning rate makes the loss non-finite: that run fails, the others still run.
    assert bench(synth_root, results, "--lr", "1e30", "--seeds", "42", method="full") == 0
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]
    assert len(records) == 2 and all(r["status"] == "failed" for r in records)
    assert all("NonFiniteLossError" in r["error"] for r in records)
    assert "failed" in capsys.readouterr().err
    board = (results / "leaderboard.md").read_text()
    assert "| full" in board


@pytest.mark.slow
def test_a_crash_in_one_task_does_not_stop_the_others(synth_root, tmp_path, monkeypatch):
    from methods.baselines import LinearProbe

    original = LinearProbe.forward_head

    def crash_on_ten_classes(self, features):
        if self.head.out_features == 10:
            raise RuntimeError("simulated crash")
        return original(self, features)

    monkeypatch.setattr(LinearProbe, "forward_head", crash_on_ten_classes)
    results = tmp_path / "results"
    assert bench(synth_root, results, "--seeds", "42") == 0
    status = {p.parent.name: json.loads(p.read_text())["status"] for p in (results / "runs").rglob("*.json")}
    assert status == {"camelyon": "ok", "svhn": "failed"}
    failed = json.loads((results / "runs/linear/svhn/final-s42.json").read_text())
    assert failed["error"] == "RuntimeError: simulated crash" and "Traceback" in failed["traceback"]
    # Resuming skips the recorded failure unless asked to retry it.
    monkeypatch.setattr(LinearProbe, "forward_head", original)
    assert bench(synth_root, results, "--seeds", "42") == 0
    assert json.loads((results / "runs/linear/svhn/final-s42.json").read_text())["status"] == "failed"
    assert bench(synth_root, results, "--seeds", "42", "--retry-failed") == 0
    assert json.loads((results / "runs/linear/svhn/final-s42.json").read_text())["status"] == "ok"


def test_leaderboard_command_and_group_means(tmp_path, capsys):
    results = tmp_path / "r"
    # Two seeds, three tasks in two groups; accuracies chosen so every mean is exact.
    accs = {
        ("cifar100", 1): 60,
        ("cifar100", 2): 70,
        ("dtd", 1): 40,
        ("dtd", 2): 50,
        ("eurosat", 1): 90,
        ("eurosat", 2): 80,
    }
    group = {"cifar100": "natural", "dtd": "natural", "eurosat": "specialized"}
    for (task, seed), acc in accs.items():
        path = results / "runs" / "m" / task / f"final-s{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "schema": 1,
                    "method": "m",
                    "task": task,
                    "group": group[task],
                    "seed": seed,
                    "protocol": "final",
                    "mode": "final",
                    "status": "ok",
                    "test_acc": acc,
                    "val_acc": None,
                    "params": {"tunable": 10, "head": 5, "backbone": 1000, "nonzero_tunable": 10},
                    "config": {},
                }
            )
        )
    assert main(["leaderboard", "--results", str(results)]) == 0
    board = write_leaderboard(results).iloc[0]
    assert board.natural_mean == 55 and board.specialized_mean == 85 and board.avg_groups_mean == 70
    assert board.avg_tasks_mean == pytest.approx(65)
    # Per-seed group means: natural 50, 60; specialized 90, 80 -> avg (groups) 70, 70 -> std 0.
    assert board.natural_std == pytest.approx(7.0710678) and board.avg_groups_std == 0
    assert board.tunable_pct == pytest.approx(1.0)
    md = capsys.readouterr().out
    assert "55.0 ± 7.1 (2/7)" in md and "85.0 ± 7.1 (1/4)" in md and "3/19" in md


# -- bad input: one line on stderr, a non-zero exit, no traceback, nothing written under --results --------------
def _bad_data(tmp_path: Path, synth_root: Path, how: str) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    if how == "no-task":
        shutil.rmtree(root / "svhn")
        return root
    split = root / "svhn" / "train800val200.txt"
    lines = split.read_text().splitlines()
    if how == "malformed":
        lines[2] = "images/train800val200/000002.jpg"
    elif how == "label":
        lines[2] = lines[2].split()[0] + " 10"
    elif how == "image":
        (root / "svhn" / lines[2].split()[0]).write_bytes(b"garbage")
    split.write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("method", r"unknown method 'nope'; known methods: " + ", ".join(list_methods())),
        ("task", r"unknown task 'nope' in suite vtab1k; known tasks: cifar100, caltech101"),
        ("root", r"data root .*nowhere does not exist; get VTAB-1k with `python -m benchmark data`"),
        ("no-task", r"no folder for task svhn in .*data \(looked for: svhn.*\); get VTAB-1k"),
        ("malformed", r"svhn/train800val200.txt:3: expected `relative/path.jpg label`"),
        ("label", r"svhn/train800val200.txt:3: label 10 is outside task svhn's classes 0..9"),
        ("image", r"cannot read image .*svhn/images/train800val200/000002.jpg"),
        ("epochs", r"argument --epochs: must be an integer from 1 to 10000, got 0"),
        ("batch", r"argument --batch-size: must be a positive integer, got -4"),
        ("results", r"cannot create results directory .*: .*not a directory"),
        ("weights", r"weights file .*missing.pth does not exist"),
        ("hub", r"not in the Hugging Face cache and HF_HUB_OFFLINE is set; .*--no-pretrained"),
    ],
)
def test_bad_input_one_line_nonzero_exit_nothing_written(case, message, synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("untouched")
    before = snapshot(results)
    root, method, tasks, extra = synth_root, "linear", TASKS_ARG, []
    if case in ("malformed", "label", "image", "no-task"):
        root = _bad_data(tmp_path, synth_root, case)
    target = results
    match case:
        case "method":
            method = "nope"
        case "task":
            tasks = "camelyon,nope"
        case "root":
            root = tmp_path / "nowhere"
        case "epochs":
            extra = ["--epochs", "0"]
        case "batch":
            extra = ["--batch-size", "-4"]
        case "results":
            (tmp_path / "afile").write_text("x")
            target = tmp_path / "afile" / "results"
        case "weights":
            extra = ["--weights", str(tmp_path / "missing.pth")]
        case "hub":
            extra = ["--backbone", "vit_base_patch16_224.orig_in21k"]
    args = argv(f"bench --method {method} --tasks {tasks} --data-root {root} --results {target} --epochs 1", *extra)
    if case == "hub":
        args.remove("--no-pretrained")
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert snapshot(results) == before
    assert not list(results.parent.rglob(".*.tmp"))


def test_bad_input_through_the_real_entry_point(tmp_path):
    """`python -m benchmark` itself: exit code 2 and a single line, no traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "benchmark", "bench", "--method", "nope", "--data-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: unknown method 'nope'; known methods: {', '.join(list_methods())}"]


def test_results_from_another_configuration_or_other_data_are_refused_not_mixed(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    assert bench(synth_root, results, "--epochs", "1", "--seeds", "42", tasks="camelyon") == 0
    before = snapshot(results)
    assert bench(synth_root, results, "--epochs", "2", "--seeds", "42", tasks="camelyon") == 2
    assert "different configuration (method_config.recipe.epochs: 1 -> 2)" in capsys.readouterr().err
    other = tmp_path / "data"
    shutil.copytree(synth_root, other)
    split = other / "patch_camelyon" / "test.txt"
    split.write_text("\n".join(split.read_text().splitlines()[:-1]) + "\n")  # one test image fewer
    assert bench(other, results, "--epochs", "1", "--seeds", "42", tasks="camelyon") == 2
    assert "from a different test.txt of camelyon" in capsys.readouterr().err
    assert snapshot(results) == before


def test_make_demo_runs_every_registered_method_once():
    """The demo's commands, as `make -n` prints them: every method in exactly one `bench` command."""
    import itertools
    import shlex
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "demo"], cwd=root, capture_output=True, text=True, check=True).stdout
    words = shlex.split(out[out.index(" -m benchmark batch ") :].replace("\\\n", " ").splitlines()[0])
    benches = [c.split() for w, c in itertools.pairwise(words) if w == "--command"]
    assert benches and all(b[0] == "bench" for b in benches)
    named = [m for words in benches for m in words[words.index("--method") + 1].split(",")]
    # `peft` is the generic tuner method; its default configuration is `peft_lora`'s, which the demo runs.
    # An installed plugin's methods (`method_origin`) are not the demo's.
    assert sorted(named) == sorted(m for m in list_methods() if m != "peft" and method_origin(m) is None)
    assert all("--threads" in words and "--epochs" in words for words in benches)
