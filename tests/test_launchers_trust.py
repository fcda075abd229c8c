"""The launchers under an outside audit's cases: a signal to a local driver ends in one line, and drivers of different
configurations never share a results directory (each process counting only the runs it executed is checked with
two drivers at once in `test_launch.py`). Each test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from benchmark.cli import main
from tests.conftest import argv
from tests.test_launch import PROJECT, leftovers, slurm_unavailable, wait_for

# Runs long enough (a few seconds each on a CPU) for signals and other processes to land while they are in flight.
SLOW = ["--set", "num_tokens=4", "--epochs", "6", "--batch-size", "32"]


def bench(results, root, *extra: str, method: str = "vpt_deep", tasks: str = "camelyon") -> list[str]:
    return argv(f"bench --method {method} --tasks {tasks} --data-root {root} --results {results}", *extra)


def start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args], cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def run_claims(results) -> list:
    """Claims on runs in flight (not the directory's settings file, claimed for a moment at a sweep's start)."""
    return list((results / "runs").glob("*/*/*.json.claim"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigterm_to_a_local_driver_ends_in_one_line_and_stops_its_workers(synth_root, tmp_path):
    """SIGTERM as `kill` or a cluster sends it to the driver. (Ctrl-C's SIGINT to the terminal's process group reaches
    only the driver too: each job's controller runs in a session of its own, and the driver stops them.)"""
    results = tmp_path / "r"
    proc = start(bench(results, synth_root, *SLOW, "--seeds", "42,44", "--launcher", "local", "--workers", "2"),
                 start_new_session=True)  # fmt: skip
    wait_for(lambda: run_claims(results) or proc.poll() is not None)
    assert proc.poll() is None, proc.stdout.read()
    workers = set()
    for claim in run_claims(results):
        with contextlib.suppress(FileNotFoundError, ValueError):  # released or being written meanwhile
            workers.add(json.loads(claim.read_text())["pid"])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM: finished runs"), out
    # Its workers stopped with it, and released their claims: nothing is left for a resume to take over.
    assert not any(alive(pid) for pid in workers)
    assert not leftovers(results)


def result_files(results) -> dict[str, bytes]:
    return {str(p.relative_to(results)): p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()}


def test_a_sweep_of_other_settings_stops_before_anything_and_one_of_the_same_settings_adds(synth_root, tmp_path,
                                                                                           capsys):  # fmt: skip
    results = tmp_path / "r"
    same = ["--epochs", "1", "--batch-size", "32", "--lr", "0.01"]
    assert main(bench(results, synth_root, *same, "--seeds", "42", method="linear")) == 0
    # Other seeds and tasks of the same settings (the options in another order, the default given) add to it.
    assert main(bench(results, synth_root, "--lr", "0.01", "--epochs", "1", "--batch-size", "32", "--seeds", "44",
                      "--precision", "32", method="linear", tasks="camelyon,svhn")) == 0  # fmt: skip
    before = result_files(results)
    capsys.readouterr()
    assert main(bench(results, synth_root, *same, "--epochs", "2", "--seeds", "82", method="linear")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "runs/linear/final.settings holds the settings" in err and "recipe.epochs: 1 -> 2" in err
    assert "--rerun-stale" in err
    assert result_files(results) == before  # nothing written
    # Several methods: all are checked before the first one's runs.
    assert main(bench(results, synth_root, *same, "--epochs", "2", "--seeds", "82", method="full,linear")) == 2
    assert "recipe.epochs: 1 -> 2" in capsys.readouterr().err and result_files(results) == before
    settings = results / "runs/linear/final.settings"
    assert set(json.loads(settings.read_text())["data"]) == {"camelyon", "svhn"}
    # Other data for a task it holds (one test image fewer) is another setting too.
    other = tmp_path / "data"
    shutil.copytree(synth_root, other)
    split = other / "patch_camelyon" / "test.txt"
    split.write_text("\n".join(split.read_text().splitlines()[:-1]) + "\n")
    assert main(bench(results, other, *same, "--seeds", "82", method="linear")) == 2
    assert "data.camelyon.test: sha256" in capsys.readouterr().err and result_files(results) == before
    # Per-task settings (VPT's recipe per task: its weight decay, warmup) are not the directory's.
    vpt = [*same, "--set", "num_tokens=4", "--seeds", "42"]
    assert main(bench(results, synth_root, *vpt, method="vpt_deep", tasks="camelyon")) == 0
    assert main(bench(results, synth_root, *vpt, method="vpt_deep", tasks="svhn")) == 0
    # --rerun-stale is the user's choice to replace them.
    assert main(bench(results, synth_root, *same, "--epochs", "2", "--seeds", "82", "--rerun-stale",
                      method="linear")) == 0  # fmt: skip
    assert json.loads(settings.read_text())["config"]["method_config"]["recipe"]["epochs"] == 2


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_a_driver_of_other_settings_stops_before_submitting_anything(launcher, synth_root, tmp_path, capsys):
    if launcher == "slurm" and (why := slurm_unavailable()):
        pytest.skip(why)
    results = tmp_path / "r"
    assert main(bench(results, synth_root, "--epochs", "1", "--seeds", "42", method="linear")) == 0
    before = result_files(results)
    capsys.readouterr()
    extra = ["--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1"] if launcher == "slurm" else []
    assert main(bench(results, synth_root, "--epochs", "2", "--seeds", "44", "--launcher", launcher, *extra,
                      method="linear")) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "recipe.epochs: 1 -> 2" in err, err
    assert result_files(results) == before and not (results / "logs").exists()


@pytest.mark.slow
def test_two_drivers_of_different_settings_started_together_leave_one_settings(synth_root, tmp_path):
    """A local driver and an inline sweep on one directory, one with 6 epochs and one with 5: one of them runs,
    the other stops before writing anything (before submitting anything, for the driver)."""
    results = tmp_path / "r"
    args = bench(results, synth_root, *SLOW, "--seeds", "42,44")
    procs = {6: start([*args, "--launcher", "local", "--workers", "2"]), 5: start([*args, "--epochs", "5"])}
    outs = {epochs: proc.communicate(timeout=300)[0] for epochs, proc in procs.items()}
    codes = {epochs: proc.returncode for epochs, proc in procs.items()}
    assert sorted(codes.values()) == [0, 2], outs
    loser = next(e for e, c in codes.items() if c == 2)
    assert f"recipe.epochs: {11 - loser} -> {loser}" in outs[loser] and "Traceback" not in outs[loser], outs[loser]
    finals = sorted((results / "runs").rglob("final-s*.json"))
    assert len(finals) == 2 and {json.loads(p.read_text())["config"]["method_config"]["recipe"]["epochs"]
                                 for p in finals} == {11 - loser}  # fmt: skip
    assert not (results / "logs").exists() or loser != 6  # the driver stopped before submitting anything


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (
            b'{"method": "linear", "protocol": "final", "config": {}, "data": {"camelyon": {"test": 3}}}',
            "data.camelyon.test",
        ),
        (b'{"method": "linear", "protocol": "best", "config": {}, "data": {}}', "protocol"),
        (b'{"method": "linear", "protocol": "final", "config": null, "data": {}}', "config"),
    ],
)
def test_a_damaged_settings_file_is_one_line_naming_it(content, why, synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    settings = results / "runs/linear/final.settings"
    settings.parent.mkdir(parents=True)
    settings.write_bytes(content)
    assert main(bench(results, synth_root, "--epochs", "1", "--seeds", "42", method="linear")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "final.settings is not a settings file of this project" in err and why in err, err
    assert settings.read_bytes() == content and list(results.rglob("*.json")) == []
