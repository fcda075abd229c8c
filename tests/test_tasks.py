"""The task table, the community folder format and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks import SPLITS, TASKS, DataError, decode_image, find_task_dir, get_task, list_tasks, parse_tasks, read_split
from tasks.synth import SynthConfig, class_recipes, write_task

SPEC_CLASSES = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "flowers102": 102,
    "pets": 37,
    "svhn": 10,
    "sun397": 397,
    "camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}


def test_table_has_the_19_tasks_of_the_spec():
    assert [t.id for t in TASKS] == list(SPEC_CLASSES)
    assert {t.id: t.num_classes for t in TASKS} == SPEC_CLASSES
    assert sum(SPEC_CLASSES.values()) == 940
    assert [len(list_tasks(g)) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert get_task("kitti").test_size == 711 and get_task("dsprites_loc").test_size == 73_728
    assert get_task("dtd").split_sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 1880}


def test_aliases_resolve_and_never_collide():
    assert get_task("cifar").id == "cifar100"
    assert get_task("Oxford_Flowers102").id == "flowers102"
    assert get_task("patch_camelyon").id == "camelyon"
    assert get_task("diabetic_retinopathy").id == "retinopathy"
    names = [n.lower() for t in TASKS for n in t.names]
    assert len(names) == len(set(names))


def test_parse_tasks():
    assert len(parse_tasks("all")) == 19
    assert [t.id for t in parse_tasks("specialized")] == ["camelyon", "eurosat", "resisc45", "retinopathy"]
    assert [t.id for t in parse_tasks("cifar, dtd,cifar100")] == ["cifar100", "dtd"]
    with pytest.raises(KeyError, match="unknown task 'nope' in suite vtab1k; known tasks: cifar100"):
        parse_tasks("dtd,nope")
    assert [t.id for t in parse_tasks("all", "fgvc")] == [
        "cub", "nabirds", "oxfordflowers", "stanforddogs", "stanfordcars"
    ]  # fmt: skip
    with pytest.raises(KeyError, match="a task of suite fgvc: pass --suite fgvc"):
        parse_tasks("cub")
    assert (
        parse_tasks("flowers")[0].id == "flowers102" and parse_tasks("OxfordFlower", "fgvc")[0].id == "oxfordflowers"
    )


def _task_dir(tmp_path, lines, name="dtd"):
    d = tmp_path / name
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "images" / "a.jpg")
    (d / "train800.txt").write_text("\n".join(lines) + "\n")
    return d


def test_read_split_parses_paths_and_labels(tmp_path):
    d = _task_dir(tmp_path, ["images/a.jpg 3", "", "images/a.jpg 46"])
    split = read_split(d, get_task("dtd"), "train800")
    assert split.labels == (3, 46) and split.images[0] == d / "images" / "a.jpg" and len(split.sha256) == 64


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("images/a.jpg", r"train800.txt:2: expected `relative/path.jpg label`"),
        ("images/a.jpg x", r"train800.txt:2: label 'x' is not an integer"),
        ("images/a.jpg 47", r"train800.txt:2: label 47 is outside task dtd's classes 0..46"),
        ("images/a.jpg -1", r"train800.txt:2: label -1 is outside"),
        ("images/missing.jpg 1", r"train800.txt:2: image .*missing.jpg does not exist"),
    ],
)
def test_read_split_rejects_bad_lines_with_file_and_line(tmp_path, line, message):
    d = _task_dir(tmp_path, ["images/a.jpg 1", line])
    with pytest.raises(DataError, match=message):
        read_split(d, get_task("dtd"), "train800")


def test_find_task_dir_uses_aliases_and_says_where_it_looked(tmp_path):
    (tmp_path / "CIFAR").mkdir()
    assert find_task_dir(tmp_path, get_task("cifar100")) == tmp_path / "CIFAR"
    with pytest.raises(DataError, match=r"no folder for task dtd in .* \(looked for: dtd"):
        find_task_dir(tmp_path, get_task("dtd"))
    with pytest.raises(DataError, match="does not exist; get VTAB-1k"):
        find_task_dir(tmp_path / "nowhere", get_task("dtd"))
    with pytest.raises(DataError, match="train800.txt is missing"):
        read_split(tmp_path / "CIFAR", get_task("cifar100"), "train800")


def test_decode_image_resizes_and_reports_unreadable_files(tmp_path):
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "x.png")
    arr = decode_image(tmp_path / "x.png", 16)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8 and tuple(arr[:, 0, 0]) == (10, 20, 30)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        decode_image(tmp_path / "bad.jpg", 16)


def test_synth_writes_the_community_layout(tmp_path):
    task = get_task("camelyon")
    config = SynthConfig(per_class=4, image_size=16, seed=3)
    d = write_task(tmp_path, task, config)
    assert d.name == "patch_camelyon"
    sizes = {s: len(read_split(d, task, s)) for s in SPLITS}
    assert sizes == {"train800": 8, "val200": 2, "train800val200": 10, "test": 8}
    union = read_split(d, task, "train800val200")
    assert all("images/train800val200/" in str(p) for p in union.images)
    assert union.labels == read_split(d, task, "train800").labels + read_split(d, task, "val200").labels
    assert set(read_split(d, task, "test").labels) == {0, 1}
    mtime = (d / "train800.txt").stat().st_mtime_ns
    write_task(tmp_path, task, config)  # identical settings: left alone
    assert (d / "train800.txt").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".tmp-*"))


def test_synth_classes_are_learnable_from_pixels(tmp_path):
    """Nearest class-mean colour already beats chance by far: the label is in the pixels."""
    task = get_task("svhn")
    d = write_task(tmp_path, task, SynthConfig(per_class=8, image_size=16, seed=0))
    recipes = class_recipes(task, 0)
    test = read_split(d, task, "test")
    colours = np.stack([decode_image(p, 16).reshape(3, -1).mean(1) / 255 for p in test.images])
    predicted = np.argmin(((colours[:, None, :] - recipes[None, :, :3]) ** 2).sum(-1), axis=1)
    assert (predicted == np.array(test.labels)).mean() > 0.5  # chance is 0.1
