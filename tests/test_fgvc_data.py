"""`python -m benchmark data --suite fgvc`: FGVC's datasets in VPT's layout from a folder or an archive, offline.

The fixture is synthetic FGVC in the real layout (`tasks.synth_fgvc`: true class counts, a few images per
class). VPT's split sizes would need thousands of images per dataset, so most tests set each dataset's
expected sizes to the fixture's own (`monkeypatch.setitem` on `Task.split_sizes`, undone after each test);
the size test keeps the real ones.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmark.cli import main
from tasks import FGVC_TASKS, find_task_dir, get_task, read_split
from tasks.sources import MARKER, STAGING_PREFIX
from tasks.synth import SynthConfig
from tasks.synth_fgvc import write_fgvc_task

FLOWERS = get_task("oxfordflowers")
CARS = get_task("stanfordcars")
CUB = get_task("cub")


@pytest.fixture(scope="session")
def fgvc_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tree>/fgvc/<dataset folder>` for all five datasets, under V-PETL's folder names."""
    tree = tmp_path_factory.mktemp("fgvc-tree")
    for task in FGVC_TASKS:
        write_fgvc_task(tree / "fgvc", task, SynthConfig(per_class=1, image_size=24, seed=0))
    return tree


@pytest.fixture
def fixture_sizes(fgvc_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expect the fixture's split sizes instead of VPT's, for this test only."""
    for task in FGVC_TASKS:
        for split in task.split_sizes:
            entries = json.loads((fgvc_tree / "fgvc" / task.folder / f"{split}.json").read_text())
            monkeypatch.setitem(task.split_sizes, split, len(entries))


def data(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["data", "--suite", "fgvc", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def one_error_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def pack(tree: Path, dest: Path) -> Path:
    """`tree` as a zip or a tar archive, by `dest`'s suffix."""
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for path in sorted(tree.rglob("*")):
                zf.write(path, path.relative_to(tree).as_posix())
    else:
        with tarfile.open(dest, "w:gz") as tf:
            tf.add(tree, arcname=".")
    return dest


def sizes_row(task) -> list[str]:
    return [str(task.split_sizes[s]) for s in ("train", "val", "test")]


def test_every_dataset_from_a_folder_is_validated_installed_then_skipped(fgvc_tree, fixture_sizes, tmp_path, capsys):
    out = tmp_path / "fgvc"
    code, stdout, err = data(capsys, "--from", str(fgvc_tree), "--out", str(out))
    assert code == 0, stdout + err
    assert err == ""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task"))
    assert lines[header].split() == ["task", "group", "classes", "train", "val", "test", "status"]
    rows = [line.split() for line in lines[header + 1 : header + 6]]
    assert rows == [[t.id, "fgvc", str(t.num_classes), *sizes_row(t), "installed"] for t in FGVC_TASKS]
    # Installed under canonical ids, each with its marker; the source is left as it was.
    assert sorted(p.name for p in out.iterdir()) == sorted(t.id for t in FGVC_TASKS)
    for task in FGVC_TASKS:
        marker = json.loads((out / task.id / MARKER).read_text())
        assert marker["task"] == task.id
        assert {s: v["lines"] for s, v in marker["splits"].items()} == task.split_sizes
        assert marker["splits"]["test"]["sha256"] == read_split(out / task.id, task, "test").sha256
        assert find_task_dir(out, task) == out / task.id
    assert (fgvc_tree / "fgvc" / "StanfordCars" / "train.json").is_file()
    # The installed copy reads as the runs read it: labels contiguous from train.json's sorted class ids.
    train = read_split(out / "nabirds", get_task("nabirds"), "train")
    assert sorted(set(train.labels)) == list(range(555))

    code, stdout, err = data(capsys, "--out", str(out))
    assert code == 0, err
    assert stdout.count("up to date") == 5


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_archive_is_unpacked_and_installed(suffix, fgvc_tree, fixture_sizes, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(fgvc_tree / "fgvc" / FLOWERS.folder, tree / "datasets" / FLOWERS.folder)
    archive = pack(tree, tmp_path / f"fgvc{suffix}")
    out = tmp_path / "fgvc"
    code, stdout, err = data(capsys, "--from", str(archive), "--out", str(out), "--tasks", "oxfordflowers")
    assert code == 0, stdout + err
    assert re.search(r"^oxfordflowers .* installed$", stdout, re.MULTILINE), stdout
    assert sorted(p.name for p in out.iterdir()) == ["oxfordflowers"]
    assert len(read_split(out / "oxfordflowers", FLOWERS, "val")) == FLOWERS.split_sizes["val"]


def test_a_split_of_another_size_says_by_how_much_and_which_copy(fgvc_tree, tmp_path, capsys):
    out = tmp_path / "fgvc"
    code, stdout, err = data(capsys, "--from", str(fgvc_tree), "--out", str(out), "--tasks", "oxfordflowers")
    assert code == 2
    assert "1 of 1 task(s) failed validation and were not installed (oxfordflowers;" in one_error_line(err)
    assert "XiN0919/FGVC" in err
    found = len(json.loads((fgvc_tree / "fgvc" / "OxfordFlower" / "train.json").read_text()))
    problem = f"OxfordFlower/train.json: expected 1020 entries, found {found} ({1020 - found} fewer); "
    problem += "VPT's split files are expected (json.zip of the Hugging Face dataset XiN0919/FGVC)"
    assert problem in stdout
    assert not out.exists() or list(out.iterdir()) == []


def _break(folder: Path, how: str) -> None:
    if how == "splits":
        for name in ("train.json", "val.json", "test.json"):
            (folder / name).unlink()
        return
    if how == "train":
        (folder / "train.json").unlink()
        return
    if how == "folder":
        shutil.rmtree(folder / "images")
        return
    split = folder / "val.json"
    entries = json.loads(split.read_text())
    first = next(iter(entries))
    if how == "list":
        split.write_text(json.dumps(list(entries.items())))
        return
    if how == "absolute":
        entries["/etc/passwd"] = entries.pop(first)
    elif how == "leaves":
        entries["../train.json"] = entries.pop(first)
    elif how == "id":
        entries[first] = "17"
    elif how == "classes":  # train.json's first image moved to another class: one class fewer than CUB's 200
        split = folder / "train.json"
        entries = json.loads(split.read_text())
        first, second = list(entries)[:2]
        entries[first] = entries[second]
    elif how == "image":
        (folder / "images" / first).unlink()
    split.write_text(json.dumps(entries))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("list", r"CUB_200_2011/val\.json holds a JSON list, not one object mapping image paths to class ids; "
                 r"VPT's split files are expected \(json\.zip of the Hugging Face dataset XiN0919/FGVC\)"),
        ("absolute", r"CUB_200_2011/val\.json: image path '/etc/passwd' is absolute; list images by their path "
                     r"relative to the image folder"),
        ("leaves", r"CUB_200_2011/val\.json: image path '\.\./train\.json' leaves the image folder"),
        ("id", r"CUB_200_2011/val\.json: class id '17' of '.*' is not an integer"),
        ("classes", r"CUB_200_2011/train\.json has 199 distinct class ids, task cub has 200 classes; VPT's split "
                    r"files are expected"),
        ("image", r"CUB_200_2011/val\.json: image .*CUB_200_2011/images/.*\.jpg does not exist; the split files "
                  r"name the images of CUB-200-2011's official release"),
        ("splits", r"CUB_200_2011: train\.json, val\.json, test\.json are missing \(task cub needs .*\); get its "
                   r"train\.json, val\.json, test\.json \(VPT's splits\) from json\.zip of "
                   r"https://huggingface\.co/datasets/XiN0919/FGVC$"),
        ("train", r"CUB_200_2011/train\.json is missing \(task cub needs train\.json, val\.json, test\.json\); get "
                  r"its train\.json, val\.json, test\.json \(VPT's splits\) from json\.zip"),
        ("folder", r"CUB_200_2011/images/ \(the image folder\) is missing; get CUB-200-2011's images "
                   r"\(CUB_200_2011\.tgz\) from https://data\.caltech\.edu/records/65de6-vp158 or .*; licence: "
                   r"non-commercial research and education only"),
    ],
)  # fmt: skip
def test_a_bad_dataset_is_one_line_and_nothing_is_installed(how, message, fgvc_tree, fixture_sizes, tmp_path, capsys):
    # From a folder, and (the first and last cases, to keep the file quick) from a zip of the same folder.
    packed = how in ("list", "image")
    tree = tmp_path / "tree"
    shutil.copytree(fgvc_tree / "fgvc" / CUB.folder, tree / CUB.folder)
    _break(tree / CUB.folder, how)
    source = pack(tree, tmp_path / "fgvc.zip") if packed else tree
    out = tmp_path / "fgvc"
    code, stdout, err = data(capsys, "--from", str(source), "--out", str(out), "--tasks", "cub")
    assert code == 2
    assert "1 of 1 task(s) failed validation and were not installed (cub;" in one_error_line(err)
    problems = [line for line in stdout.splitlines() if line.startswith("  cub: ")]
    assert len(problems) == 1 and re.search(message, problems[0]), stdout
    assert not out.exists() or list(out.iterdir()) == []


def _kaggle_cars(root: Path) -> None:
    """Stanford Cars as Kaggle ships it: cars_train/ and cars_test/ with 5-digit ids, no car_ims/."""
    for split in ("cars_train", "cars_test"):
        (root / split).mkdir(parents=True)
        (root / split / "00001.jpg").write_bytes(b"")


def test_the_kaggle_cars_layout_says_what_to_fetch(fgvc_tree, fixture_sizes, tmp_path, capsys):
    # The split files next to Kaggle's folders: the dataset folder is found, its layout refused.
    tree = tmp_path / "tree"
    shutil.copytree(fgvc_tree / "fgvc" / CARS.folder, tree / CARS.folder)
    shutil.rmtree(tree / CARS.folder / "car_ims")
    _kaggle_cars(tree / CARS.folder)
    out = tmp_path / "fgvc"
    code, stdout, err = data(capsys, "--from", str(tree), "--out", str(out), "--tasks", "stanfordcars")
    assert code == 2
    one_error_line(err)
    problems = [line for line in stdout.splitlines() if line.startswith("  stanfordcars: ")]
    assert len(problems) == 1, stdout
    assert "this is the Kaggle layout of Stanford Cars (cars_train/, cars_test/, 5-digit ids)" in problems[0]
    assert "fetch car_ims.tgz and cars_annos.mat from https://huggingface.co/datasets/XiN0919/FGVC" in problems[0]
    assert not out.exists() or list(out.iterdir()) == []

    # Kaggle's download as it unpacks, with no StanfordCars folder at all: still named for what it is.
    kaggle = tmp_path / "kaggle"
    _kaggle_cars(kaggle / "stanford-cars-dataset")
    for source in (kaggle, pack(kaggle, tmp_path / "stanford-cars-dataset.zip")):
        code, stdout, err = data(capsys, "--from", str(source), "--out", str(out), "--tasks", "stanfordcars")
        assert code == 2
        one_error_line(err)
        found = r"^  stanfordcars: no folder for task stanfordcars in .*; this is the Kaggle layout of Stanford Cars"
        assert re.search(found, stdout, re.MULTILINE), stdout
        assert not out.exists() or list(out.iterdir()) == []


def test_missing_datasets_say_where_to_get_them_and_on_what_terms(fgvc_tree, fixture_sizes, tmp_path, capsys):
    out = tmp_path / "fgvc"
    shutil.copytree(fgvc_tree / "fgvc" / CUB.folder, out / CUB.folder)  # already unpacked into the data folder
    code, stdout, err = data(capsys, "--out", str(out), "--tasks", "cub,nabirds,stanforddogs")
    assert code == 2
    assert "2 of 3 task(s) failed validation and were not installed (nabirds, stanforddogs;" in one_error_line(err)
    assert re.search(r"^cub .* validated in place$", stdout, re.MULTILINE), stdout
    dogs = next(line for line in stdout.splitlines() if line.startswith("  stanforddogs: "))
    assert f"not in {out} and no --from given" in dogs
    assert "http://vision.stanford.edu/aditya86/ImageNetDogs/" in dogs and "images.tar" in dogs
    assert "json.zip" in dogs and "licence: non-commercial research" in dogs and "ImageNet" in dogs
    birds = next(line for line in stdout.splitlines() if line.startswith("  nabirds: "))
    assert "https://dl.allaboutbirds.org/nabirds" in birds and "Cornell Lab" in birds
    assert sorted(p.name for p in out.iterdir()) == ["cub"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())


def test_bad_fgvc_arguments(tmp_path, capsys):
    code, _, err = data(capsys, "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert "does not exist; pass a folder or archive holding the FGVC datasets in VPT's layout" in one_error_line(err)
    code, _, err = data(capsys, "--tasks", "kitti", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "unknown task 'kitti' in suite fgvc (it is a task of suite vtab1k" in one_error_line(err)
    assert not (tmp_path / "out").exists()
