"""Paths from options and the environment, damaged cache entries, images and sizes too large: each is one line
and exit 2 (or, for a damaged cache entry, one line and a rebuild), checked before anything is written."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from tasks import get_task
from tasks.synth import SynthConfig, write_task
from tests.conftest import argv

ROOT = Path(__file__).resolve().parents[1]
KITTI = get_task("kitti")
RUN = "run --method linear --task svhn --protocol tune --epochs 1"
BENCH = "bench --method linear --tasks svhn --seeds 1 --protocol final --epochs 1"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def kitti_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive, `<tree>/vtab-1k/kitti`, with the real line counts (a few 16-px images over and over)."""
    tree = tmp_path_factory.mktemp("tree")
    folder = write_task(tree / "vtab-1k", KITTI, SynthConfig(per_class=2, image_size=16, seed=0))
    (folder / "synth.json").unlink(missing_ok=True)
    for split, n in KITTI.split_sizes.items():
        path = folder / f"{split}.txt"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n")
    return tree


# -- paths from options and the environment -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "source"),
    [("option", "--cache-dir"), ("PEFT_BENCH_CACHE", "$PEFT_BENCH_CACHE"), ("HOME", "$HOME")],
)
def test_a_cache_dir_that_is_a_file_is_one_line_before_anything(setting, source, synth_root, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    """`$HOME` in a subprocess, as libraries read it at import too (matplotlib complains about it in two lines)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    monkeypatch.delenv("PEFT_BENCH_CACHE", raising=False)
    extra = ["--cache-dir", str(a_file)] if setting == "option" else []
    results = tmp_path / "results"
    args = argv(RUN, "--data-root", str(synth_root), "--results", str(results), *extra)
    if setting == "HOME":
        env = {k: v for k, v in os.environ.items() if k not in ("PEFT_BENCH_CACHE", "MPLCONFIGDIR")}
        env["HOME"] = str(a_file)
        proc = subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True)  # fmt: skip
        code, err = proc.returncode, proc.stderr
    else:
        if setting != "option":
            monkeypatch.setenv(setting, str(a_file))
        code, err = main(args), capsys.readouterr().err
    line = one_line(err)
    assert code == 2
    assert line.startswith("error: image cache directory ") and f"(from {source})" in line, line
    assert f"{a_file} is not a directory" in line or line.endswith("naming a directory"), line
    assert "--cache-dir DIR (or set $PEFT_BENCH_CACHE)" in line
    assert not results.exists() and a_file.read_text() == "not a directory"


@pytest.mark.parametrize("variable", ["VTAB_ROOT", "HOME"])
def test_data_names_the_variable_its_unusable_default_came_from(variable, kitti_tree, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.delenv("VTAB_ROOT", raising=False)
    monkeypatch.setenv(variable, str(a_file))
    code, _, err = cli(capsys, "data", "--from", str(kitti_tree), "--tasks", "kitti", "--no-cache")
    line = one_line(err)
    assert code == 2 and f"data directory {a_file}" in line and f"(from ${variable})" in line, line
    assert "pass --out DIR (or set $VTAB_ROOT)" in line


def test_a_log_path_that_is_a_file_stops_a_local_sweep_before_anything(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "logs").write_text("a file where the job logs go")
    args = argv(BENCH, "--data-root", str(synth_root), "--results", str(results), "--launcher", "local")
    code, _, err = cli(capsys, *args, "--workers", "1")
    line = one_line(err)
    assert code == 2 and f"job log directory {results / 'logs' / 'linear'}" in line, line
    assert f"{results / 'logs'} is not a directory; move it away or pick another --results" in line
    assert sorted(p.name for p in results.iterdir()) == ["logs"]


@pytest.fixture(scope="module")
def finished(synth_root, tmp_path_factory) -> Path:
    """A results directory holding one final run, and its reports."""
    results = tmp_path_factory.mktemp("finished")
    assert main(argv(BENCH, "--data-root", str(synth_root), "--results", str(results))) == 0
    return results


REPORTS = ["leaderboard.md", "leaderboard.csv", "accuracy_vs_params.png", "leaderboard.html"]


@pytest.mark.parametrize("name", REPORTS)
def test_leaderboard_refuses_a_report_path_that_is_a_directory_and_writes_none(name, finished, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    (results / name).unlink()
    (results / name).mkdir()
    before = {p: p.stat().st_mtime_ns for p in files_under(results)}
    code, _, err = cli(capsys, "leaderboard", "--results", str(results))
    line = one_line(err)
    assert code == 2 and line == f"error: {results / name} is a directory where a file belongs; move it away or pick " \
        "another --results"  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in files_under(results)} == before  # no report rewritten


@pytest.mark.parametrize("name", ["compare.md", "compare.csv"])
def test_compare_refuses_an_output_path_that_is_a_directory(name, finished, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    (results / name).mkdir()
    before = files_under(results)
    code, _, err = cli(capsys, "compare", "--results", str(results))
    assert code == 2 and one_line(err) == f"error: {results / name} is a directory where a file belongs; move it " \
        "away or pick another --results"  # fmt: skip
    assert files_under(results) == before


# -- the image cache ----------------------------------------------------------------------------------------
def test_a_truncated_cache_entry_is_rebuilt_with_one_line(kitti_tree, tmp_path, capsys):
    out, cache = tmp_path / "vtab", tmp_path / "cache"
    args = ["data", "--from", str(kitti_tree), "--out", str(out), "--tasks", "kitti", "--image-size", "16"]
    assert cli(capsys, *args, "--cache-dir", str(cache))[0] == 0
    [entry] = cache.glob("kitti-train800-*.npy")
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    code, _, err = cli(capsys, *args, "--cache-dir", str(cache))
    assert code == 0, err
    assert err.strip() == f"image cache entry {entry} is truncated ({len(whole) // 2} of {len(whole)} bytes); " \
        "rebuilding it"  # fmt: skip
    assert entry.read_bytes() == whole
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_cache_too_large_for_the_disk_is_refused_before_allocating(kitti_tree, tmp_path):
    """Real sizes, nothing faked: 300,000-px images need hundreds of TiB. Run with an address-space limit, so a
    build that allocated first would fail here rather than fill the machine."""
    out, cache = tmp_path / "vtab", tmp_path / "cache"
    args = ["data", "--from", str(kitti_tree), "--out", str(out), "--tasks", "kitti", "--image-size", "300000"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))

    proc = subprocess.run([sys.executable, "-m", "benchmark", *args, "--cache-dir", str(cache)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)  # fmt: skip
    line = one_line(proc.stderr)
    assert proc.returncode == 2
    assert line.startswith("error: the image cache of 4 split(s) (2711 images at 300000 px) needs "), line
    assert " TiB in " in line and " is free there; free some space, pass a smaller --image-size" in line
    assert files_under(cache) == []


def test_decoding_that_cannot_fit_in_memory_is_refused_before_allocating(kitti_tree, tmp_path, monkeypatch, capsys):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16 kB\nMemFree:         8 kB\nMemAvailable:   10 kB\n")
    monkeypatch.setattr("benchmark.core.paths.MEMINFO", meminfo)
    cache = tmp_path / "cache"
    args = ["--from", str(kitti_tree), "--out", str(tmp_path / "vtab"), "--tasks", "kitti", "--image-size", "64"]
    code, _, err = cli(capsys, "data", *args, "--cache-dir", str(cache))
    line = one_line(err)
    assert code == 2 and " at 64 px needs about 68.0 KiB of memory, and 10.0 KiB is available; pass a smaller " \
        "--image-size" in line, line  # fmt: skip
    assert files_under(cache) == []


# -- images over Pillow's decompression-bomb limit ----------------------------------------------------------
LIMIT = 1100  # the 32-px synthetic images have 1,024 pixels


@pytest.mark.parametrize(("side", "pillow"), [(40, "warns"), (64, "refuses")])
def test_an_image_over_the_pixel_limit_is_refused_in_one_line(side, pillow, synth_root, tmp_path, monkeypatch, capsys):
    """40 px (1,600 pixels): Pillow only warns and decodes it; 64 px (4,096, over twice the limit): Pillow raises."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    name = (root / "svhn" / "train800.txt").read_text().split()[0]
    Image.new("RGB", (side, side), (9, 9, 9)).save(root / "svhn" / name, format="PNG")
    cache, results = tmp_path / "cache", tmp_path / "results"
    code, _, err = cli(
        capsys, *argv(RUN, "--data-root", str(root), "--results", str(results), "--cache-dir", str(cache))
    )
    line = one_line(err)
    assert code == 2 and line == (
        f"error: cannot read image {root / 'svhn' / name}: {side * side} pixels, over the decompression-bomb limit "
        f"of {LIMIT} (PIL.Image.MAX_IMAGE_PIXELS); shrink the image or remove it from its split file"
    )
    assert not list(cache.glob("svhn-train800-*")) and not [p for p in files_under(cache) if p.name.startswith(".")]
    assert not list(results.rglob("*.json"))


def test_data_reports_an_image_over_the_pixel_limit_as_invalid(kitti_tree, tmp_path, monkeypatch, capsys):
    """As any image that does not decode: the task fails validation, is not installed, and `data` exits 2."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the 16-px images have 256 pixels
    tree = tmp_path / "tree"
    shutil.copytree(kitti_tree, tree)
    folder = tree / "vtab-1k" / KITTI.folder
    name = (folder / "train800.txt").read_text().split()[0]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / name, format="PNG")  # 400 pixels: Pillow warns
    out = tmp_path / "vtab"
    code, stdout, err = cli(capsys, "data", "--from", str(tree), "--out", str(out), "--tasks", "kitti")
    assert code == 2 and "1 of 1 task(s) failed validation and were not installed (kitti;" in one_line(err)
    problems = [line for line in stdout.splitlines() if "decompression-bomb limit" in line]
    assert len(problems) == 1 and name in problems[0] and "400 pixels" in problems[0], stdout
    assert not (out / KITTI.id).exists() and not (out / KITTI.folder).exists()


def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = cli(capsys, *argv(RUN, "--data-root", str(a_file), "--results", str(tmp_path / "results")))
    assert code == 2 and one_line(err).startswith(f"error: data root {a_file} is not a directory; get VTAB-1k with")
    assert not (tmp_path / "results").exists()


def test_data_hf_refuses_a_file_where_the_datasets_go_before_installing(kitti_tree, tmp_path, capsys):
    out = tmp_path / "vtab"
    out.mkdir()
    (out / "hf").write_text("a file where the datasets go")
    code, _, err = cli(capsys, "data", "--from", str(kitti_tree), "--out", str(out), "--tasks", "kitti", "--hf")
    line = one_line(err)
    assert code == 2 and line == f"error: Hugging Face dataset directory {out / 'hf'} (from --out) is not a " \
        "directory; move it away or pick another --out"  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["hf"]


@pytest.mark.parametrize("mode", [["--scaleout", "1"], ["--slurm"]])
def test_perf_measurements_refuse_an_output_path_that_is_a_file_before_measuring(mode, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = cli(capsys, "perf", *mode, "--out", str(a_file))
    assert code == 2 and one_line(err) == f"error: the perf tables {a_file} is a file; pass a directory to --out"


def test_reproduce_refuses_a_comparison_path_that_is_a_directory_before_training(synth_root, tmp_path, capsys):
    results = tmp_path / "repro"
    (results / "compare.csv").mkdir(parents=True)
    args = ["reproduce", "--method", "linear", "--budget", "quick", "--tasks", "svhn", "--data-root", str(synth_root),
            "--results", str(results), "--epochs", "1", *argv("")]  # fmt: skip
    code, _, err = cli(capsys, *args)
    assert code == 2 and one_line(err) == f"error: {results / 'compare.csv'} is a directory where a file belongs; " \
        "move it away or pick another --results"  # fmt: skip
    assert files_under(results) == []


def test_the_cache_of_every_split_is_checked_for_space_together(kitti_tree, tmp_path, monkeypatch, capsys):
    """Each of kitti's splits at 16 px fits in the 1 MiB the disk reports free, all four (2 MiB) do not: nothing
    is decoded. The free space is what `statvfs` says, as for a small disk."""
    statvfs = os.statvfs

    def small_disk(path):
        real = statvfs(path)
        return os.statvfs_result((*real[:4], 2**20 // real.f_frsize, *real[5:]))

    out, cache = tmp_path / "vtab", tmp_path / "cache"
    monkeypatch.setattr(os, "statvfs", small_disk)
    code, _, err = cli(capsys, "data", "--from", str(kitti_tree), "--out", str(out), "--tasks", "kitti",
                       "--image-size", "16", "--cache-dir", str(cache))  # fmt: skip
    line = one_line(err)
    assert code == 2 and line == f"error: the image cache of 4 split(s) (2711 images at 16 px) needs 2.0 MiB in " \
        f"{cache}, and 1.0 MiB is free there; free some space, pass a smaller --image-size, or point --cache-dir " \
        "(or $PEFT_BENCH_CACHE) elsewhere"  # fmt: skip
    assert files_under(cache) == []
