"""FGVC on the command line: `tasks --suite fgvc`, `synth --suite fgvc`, `params --suite fgvc`, the suite on
`run`, and task names that stay unique across suites."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main
from tasks import ALL_TASKS, SUITES, find_task_dir, get_task, list_tasks, read_split

# VPT's appendix table (docs/data.md, FGVC): classes and train / val / test sizes.
FGVC_TABLE = {
    "cub": (200, 5_394, 600, 5_794),
    "nabirds": (555, 21_536, 2_393, 24_633),
    "oxfordflowers": (102, 1_020, 1_020, 6_149),
    "stanforddogs": (120, 10_800, 1_200, 8_580),
    "stanfordcars": (196, 7_329, 815, 8_041),
}


def test_tasks_command_prints_the_fgvc_table(capsys):
    assert main(["tasks", "--suite", "fgvc"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == set(FGVC_TABLE)
    for task_id, numbers in FGVC_TABLE.items():
        assert all(str(n) in rows[task_id].split() for n in numbers), rows[task_id]
        assert get_task(task_id).folder in rows[task_id]
    assert "tune on train -> val, final runs on train -> test" in out
    assert main(["tasks"]) == 0 and "cifar100" in capsys.readouterr().out  # VTAB-1k stays the default


def test_task_names_are_unique_across_suites():
    names = [n.lower() for t in ALL_TASKS for n in t.names]
    assert len(names) == len(set(names))
    assert {t.suite for t in ALL_TASKS} == set(SUITES)
    assert get_task("flowers102").suite == "vtab1k" and get_task("oxfordflowers").suite == "fgvc"


def test_synth_writes_the_real_layout_at_the_true_class_counts(tmp_path, capsys):
    out = tmp_path / "fgvc"
    assert main(["synth", "--suite", "fgvc", "--out", str(out), "--image-size", "16", "--per-class", "1"]) == 0
    assert "5 synthetic task(s)" in capsys.readouterr().out
    sizes = set()
    for task in list_tasks(suite="fgvc"):
        task_dir = find_task_dir(out, task)
        assert task_dir.name == task.folder
        for split in ("train", "val", "test"):
            data = json.loads((task_dir / f"{split}.json").read_text())
            assert isinstance(data, dict) and all(type(v) is int for v in data.values())
            parsed = read_split(task_dir, task, split)
            assert sorted(set(parsed.labels)) == list(range(task.num_classes))
            assert all(p.is_relative_to(task_dir / task.image_root) for p in parsed.images)
        from PIL import Image

        for image in parsed.images[:5]:
            with Image.open(image) as im:
                sizes.add(im.size)
    assert any(w != h for w, h in sizes) and len(sizes) > 3  # non-square, of varied sizes
    assert all(k.startswith("car_ims/") for k in json.loads((out / "StanfordCars" / "test.json").read_text()))
    # NABirds' ids are sparse, as in the real files: the remapping to contiguous labels is exercised.
    assert max(json.loads((out / "nabirds" / "train.json").read_text()).values()) > 555


def test_params_takes_the_suite(capsys):
    assert main(["params", "--suite", "fgvc", "--methods", "linear", "--backbone", "vit_base_patch16_224",
                 "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert {r["task"]: r["head"] for r in rows} == {t: 769 * c for t, (c, *_) in FGVC_TABLE.items()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--method", "linear", "--task", "cub"], "is a task of suite fgvc: pass --suite fgvc"),
        (["bench", "--method", "linear", "--suite", "fgvc", "--tasks", "dtd"], "is a task of suite vtab1k"),
        (["tasks", "--suite", "imagenet"], "invalid choice: 'imagenet'"),
    ],
)
def test_a_task_of_another_suite_is_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--results", str(tmp_path / "r")] if argv[0] != "tasks" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep", "e2vpt"])
def test_prompt_methods_take_vpts_fgvc_recipe_on_fgvc_tasks(method):
    import methods
    from benchmark.run.resolve import resolve_config

    cls = methods.get_method(method)
    for task in list_tasks(suite="fgvc"):
        recipe = resolve_config(cls, task.id).recipe
        # tune_fgvc.py's prompt grid, scaled by batch/256 at the prompt configs' batch of 128.
        assert recipe.batch_size == 128
        assert recipe.lr_grid == tuple(b * 128 / 256 for b in (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1))
        assert recipe.wd_grid == (0.01, 1e-3, 1e-4, 0.0) and recipe.epochs == 100 and recipe.warmup_epochs == 10
    assert len(resolve_config(cls, "dtd").recipe.lr_grid) == 10  # VTAB-1k's grid keeps 0.05


def test_bench_on_all_five_then_leaderboard_compare_and_reproduce(tmp_path, capsys):
    """The issue's path: synthetic FGVC, `bench --suite fgvc --method vpt_deep` on the five datasets, a leaderboard
    with the FGVC mean, `compare --table vpt` with both halves; `reproduce --suite fgvc` compares with FGVC's rows."""
    from tests.conftest import argv

    data = tmp_path / "fgvc"
    assert main(["synth", "--suite", "fgvc", "--out", str(data), "--image-size", "24", "--per-class", "1"]) == 0
    results = tmp_path / "r"
    assert main(argv(f"bench --suite fgvc --method vpt_deep --data-root {data} --epochs 1 --seeds 42 --set "
                     f"num_tokens=2 --results {results}")) == 0  # fmt: skip
    records = [json.loads(p.read_text()) for p in sorted((results / "runs" / "vpt_deep").rglob("*.json"))]
    assert sorted(r["task"] for r in records) == sorted(FGVC_TABLE) and all(r["status"] == "ok" for r in records)
    assert {r["data"]["train_split"]["name"] for r in records} == {"train"}
    assert {r["config"]["interpolation"] for r in records} == {"bilinear"}  # VPT's Resize default on FGVC
    board = (results / "leaderboard.md").read_text()
    header = next(line for line in board.splitlines() if "| cub" in line or "cub |" in line)
    assert "mean" in header and all(t in header for t in FGVC_TABLE)
    csv = (results / "leaderboard-fgvc.csv").read_text().splitlines()
    assert "mean" in csv[0] and "vpt_deep" in csv[1]

    capsys.readouterr()
    assert main(["compare", "--results", str(results), "--table", "vpt"]) == 0
    out = capsys.readouterr().out
    assert "FGVC" in out and "VTAB-1k" in out and "89.1" in out  # VPT-deep's published FGVC mean beside ours

    rep = tmp_path / "rep"
    assert main(argv(f"reproduce --suite fgvc --method linear --tasks cub --budget quick --epochs 1 "
                     f"--data-root {data} --results {rep}")) == 0  # fmt: skip
    compared = (rep / "compare-fgvc.md").read_text()
    assert "linear" in compared and "85.3" in compared  # VPT's linear row on CUB
    assert not (rep / "compare.md").exists()
