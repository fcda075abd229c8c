"""`python -m benchmark data` (fetch, validate, install, cache, export) and `perf --data`, offline.

The archive fixture has the real layout and real line counts: `vtab-1k/kitti/<split>.txt` with 800 /
200 / 1,000 / 711 lines, which reference a few small synthetic images over and over.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.data.arrays import default_cache_dir
from tasks import SPLITS, find_task_dir, get_task, read_split
from tasks.sources import MARKER, STAGING_PREFIX
from tasks.synth import SynthConfig, write_task

KITTI = get_task("kitti")
CIFAR = get_task("cifar100")


def _real_line_counts(task_dir: Path, task) -> None:
    """Rewrite the split files to the real line counts, cycling over the lines (and images) there are."""
    (task_dir / "synth.json").unlink(missing_ok=True)
    for split, n in task.split_sizes.items():
        path = task_dir / f"{split}.txt"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n")


@pytest.fixture(scope="session")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tree>/vtab-1k/kitti` in the real layout, under its NOAH folder name."""
    tree = tmp_path_factory.mktemp("archive-tree")
    folder = write_task(tree / "vtab-1k", KITTI, SynthConfig(per_class=2, image_size=16, seed=0))
    assert folder.name == KITTI.folder
    _real_line_counts(folder, KITTI)
    return tree


def make_zip(tree: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(tree.rglob("*")):
            zf.write(path, path.relative_to(tree).as_posix())
    return dest


def snapshot(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def cached(task: str = "kitti") -> set[Path]:
    cache = default_cache_dir()
    return set(cache.glob(f"{task}-*.npy")) if cache.is_dir() else set()


def data(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def one_error_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_data_from_zip_validates_installs_caches_exports_then_skips(real_tree, tmp_path, capsys):
    import datasets

    archive = make_zip(real_tree, tmp_path / "vtab-1k.zip")
    out = tmp_path / "vtab"
    before = cached()
    args = ["--from", str(archive), "--out", str(out), "--tasks", "kitti", "--image-size", "16", "--hf"]
    code, stdout, err = data(capsys, *args)
    assert code == 0, err
    assert err == ""
    table = stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("task"))
    assert table[header].split() == ["task", "group", "classes", *SPLITS, "status"]
    assert table[header + 1].split() == ["kitti", "structured", "4", "800", "200", "1000", "711", "installed"]
    # Installed under the canonical id, marker written, nothing left behind.
    assert sorted(p.name for p in out.iterdir()) == ["hf", "kitti"]
    assert find_task_dir(out, KITTI) == out / "kitti"
    marker = json.loads((out / "kitti" / MARKER).read_text())
    assert marker["task"] == "kitti" and set(marker["splits"]) == set(SPLITS)
    assert marker["source"] == {"path": str(archive), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    assert {s: v["lines"] for s, v in marker["splits"].items()} == KITTI.split_sizes
    assert marker["splits"]["test"]["sha256"] == read_split(out / "kitti", KITTI, "test").sha256
    # The uint8 cache: one array per split at the requested size.
    new = cached() - before
    assert sorted(re.sub(r"-[0-9a-f]{16}\.npy$", "", p.name) for p in new) == sorted(
        f"kitti-{s}-16px-bicubic" for s in SPLITS
    )
    # The Hugging Face copy.
    dd = datasets.load_from_disk(str(out / "hf" / "kitti"))
    assert set(dd) == set(SPLITS)
    assert {s: len(dd[s]) for s in SPLITS} == KITTI.split_sizes
    assert dd["test"].features["label"] == datasets.ClassLabel(num_classes=4)
    assert isinstance(dd["test"].features["image"], datasets.Image)
    first = dd["val200"][0]
    assert first["image"].size == (16, 16) and first["label"] == read_split(out / "kitti", KITTI, "val200").labels[0]

    # Again: everything is up to date; no file under --out or in the cache is rewritten.
    files, arrays = snapshot(out), {p: p.stat().st_mtime_ns for p in cached()}
    code, stdout, err = data(capsys, *args)
    assert code == 0, err
    assert "up to date" in stdout and "installed" not in stdout.split("status", 1)[1].splitlines()[1]
    assert snapshot(out) == files
    assert {p: p.stat().st_mtime_ns for p in cached()} == arrays


def test_data_from_folder_maps_aliases_to_canonical_ids(real_tree, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(real_tree, tree)
    (tree / "vtab-1k" / "kitti").rename(tree / "vtab-1k" / "KITTI_closest_vehicle_distance")
    cifar = write_task(tree / "vtab-1k", CIFAR, SynthConfig(per_class=1, image_size=8, seed=0))
    assert cifar.name == "cifar"  # NOAH's folder name for cifar100
    _real_line_counts(cifar, CIFAR)
    out = tmp_path / "vtab"
    code, stdout, err = data(capsys, "--from", str(tree), "--out", str(out), "--tasks", "cifar100,kitti", "--no-cache")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cifar100", "kitti"]
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("cifar100 ", "kitti "))]
    assert rows == [
        ["cifar100", "natural", "100", "800", "200", "1000", "10000", "installed"],
        ["kitti", "structured", "4", "800", "200", "1000", "711", "installed"],
    ]
    # The source is left as it was.
    assert (tree / "vtab-1k" / "cifar" / "test.txt").is_file()


def test_tar_gz_archive(real_tree, tmp_path, capsys):
    archive = tmp_path / "vtab-1k.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(real_tree / "vtab-1k", arcname="vtab-1k")
    out = tmp_path / "vtab"
    code, stdout, err = data(capsys, "--from", str(archive), "--out", str(out), "--tasks", "kitti", "--no-cache")
    assert code == 0, err
    assert re.search(r"^kitti .* installed$", stdout, re.MULTILINE), stdout
    assert (out / "kitti" / MARKER).is_file()


def test_a_valid_folder_already_under_out_is_validated_in_place_without_a_source(real_tree, tmp_path, capsys):
    out = tmp_path / "vtab"
    shutil.copytree(real_tree / "vtab-1k" / "kitti", out / "kitti_closest_vehicle_distance")
    # No --from and HF_HUB_OFFLINE=1 (conftest): a download attempt would fail.
    code, stdout, err = data(capsys, "--out", str(out), "--tasks", "kitti", "--no-cache")
    assert code == 0, err
    assert "validated in place" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["kitti"] and (out / "kitti" / MARKER).is_file()


def _break(task_dir: Path, how: str) -> None:
    if how == "missing-split":
        (task_dir / "val200.txt").unlink()
    elif how == "count":
        lines = (task_dir / "test.txt").read_text().splitlines()
        (task_dir / "test.txt").write_text("\n".join(lines[:-1]) + "\n")
    elif how == "label":
        lines = (task_dir / "train800.txt").read_text().splitlines()
        lines[2] = lines[2].split()[0] + " 4"
        (task_dir / "train800.txt").write_text("\n".join(lines) + "\n")
    elif how == "image":
        (task_dir / "images" / "test" / "000001.jpg").write_bytes(b"not a jpeg")


ZIP_TASK = r"vtab-1k\.zip!/vtab-1k/kitti"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing-split", ZIP_TASK + r"/val200\.txt is missing \(task kitti needs train800\.txt, val200\.txt"),
        ("count", ZIP_TASK + r"/test\.txt: expected 711 lines, found 710"),
        ("label", ZIP_TASK + r"/train800\.txt:3: label 4 is outside task kitti's classes 0\.\.3"),
        ("image", r"cannot read image .*" + ZIP_TASK + r"/images/test/000001\.jpg"),
    ],
)
def test_a_bad_archive_is_reported_precisely_and_nothing_is_installed(how, message, real_tree, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(real_tree, tree)
    _break(tree / "vtab-1k" / "kitti", how)
    archive = make_zip(tree, tmp_path / "vtab-1k.zip")
    out = tmp_path / "vtab"
    before = cached()
    code, stdout, err = data(
        capsys, "--from", str(archive), "--out", str(out), "--tasks", "kitti", "--image-size", "16", "--hf"
    )
    assert code == 2
    assert re.search(r"1 of 1 task\(s\) failed validation and were not installed \(kitti;", one_error_line(err))
    assert "--from" in err or "run the same command again" in err
    problems = [line.strip() for line in stdout.splitlines() if line.startswith("  kitti: ")]
    assert any(re.search(message, p) for p in problems), stdout
    assert re.search(r"^kitti .* FAILED \(\d+ problems?\)$", stdout, re.MULTILINE), stdout
    assert not out.exists() or list(out.iterdir()) == []
    assert cached() == before


def test_other_tasks_go_on_when_one_is_missing_from_the_archive(real_tree, tmp_path, capsys):
    archive = make_zip(real_tree, tmp_path / "vtab-1k.zip")
    out = tmp_path / "vtab"
    code, stdout, err = data(capsys, "--from", str(archive), "--out", str(out), "--tasks", "dtd,kitti", "--no-cache")
    assert code == 2
    assert "1 of 2 task(s) failed validation and were not installed (dtd;" in one_error_line(err)
    assert re.search(r"^dtd .* missing$", stdout, re.MULTILINE)
    assert "dtd: no folder for task dtd in" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["kitti"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())


@pytest.mark.parametrize("how", ["offline", "unreachable", "download"])
def test_a_failing_download_is_one_line_naming_the_repo_and_from(how, tmp_path, capsys, monkeypatch):
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    connections = []

    def no_network(address, timeout=None):
        connections.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    downloads = []
    if how != "offline":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if how == "download":

        class Connection:
            def close(self) -> None:
                pass

        monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())

        def fail(**kwargs):
            downloads.append(kwargs)
            raise RuntimeError("503 Server Error\nmore detail")

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    out = tmp_path / "vtab"
    code, _, err = data(capsys, "--out", str(out), "--tasks", "kitti")
    assert code == 2
    one_error_line(err)
    assert "XiN0919/VTAB-1k" in err and "--from FILE" in err and "vtab-1k.zip" in err
    expected = {
        "offline": "HF_HUB_OFFLINE is set",
        "unreachable": "cannot reach the Hugging Face Hub",
        "download": "could not download vtab-1k.zip",
    }[how]
    assert expected in err
    assert connections == ([("huggingface.co", 443)] if how == "unreachable" else [])
    if how == "download":
        assert downloads == [
            {"repo_id": "XiN0919/VTAB-1k", "filename": "vtab-1k.zip", "repo_type": "dataset", "revision": None}
        ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "{tmp}/nope.zip"], r"--from .*nope\.zip does not exist; pass the downloaded vtab-1k\.zip"),
        (["--from", "{tmp}/junk.zip"], r"junk\.zip is neither a folder nor a zip or tar archive"),
        (["--tasks", "nope"], r"unknown task 'nope'"),
        (["--image-size", "0"], r"argument --image-size: must be a positive integer"),
    ],
)
def test_bad_data_arguments(args, message, tmp_path, capsys):
    (tmp_path / "junk.zip").write_bytes(b"junk")
    out = tmp_path / "vtab"
    code, _, err = data(capsys, "--out", str(out), *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert re.search(message, one_error_line(err)), err
    assert not out.exists()


def test_perf_data_cached_loader_beats_decoding(capsys):
    capsys.readouterr()
    code = main(["perf", "--data", "--image-size", "32", "--epochs", "2", "--batch-size", "32", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["split"], r["augment"]) for r in rows] == [
        ("eurosat", "train800val200", "none"),
        ("cub", "train", "random crop + flip"),
    ]
    for row in rows:
        assert row["data"] == "synthetic" and row["cached_images_per_s"] > 0 and row["decode_images_per_s"] > 0
        assert row["ratio"] > 1, row


def test_perf_modes_exclude_each_other(capsys):
    capsys.readouterr()
    assert main(["perf", "--data", "--sweep"]) == 2
    assert "not allowed with argument" in one_error_line(capsys.readouterr().err.strip())
