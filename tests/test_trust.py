"""What an outside audit found: results that are never mixed or silently wrong, clean ends on signals and full
disks, and bad input refused before any work. Each test failed on the code before its fix."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.report.leaderboard import write_leaderboard
from benchmark.sweep import claims
from benchmark.sweep import graph as sweep
from tests.conftest import argv
from tests.test_compare import write_run

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and re.search(pattern, err), err
    return err


def bench_args(synth_root: Path, results: Path, *extra: str, method: str = "linear", seeds: str = "42") -> list[str]:
    return argv(
        f"bench --method {method} --tasks svhn --data-root {synth_root} --results {results}",
        "--epochs", "2", "--batch-size", "32", "--seeds", seeds, *extra,
    )  # fmt: skip


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- 5. results of different configurations never mix -------------------------------------------------------
def test_a_result_written_meanwhile_with_another_configuration_is_not_overwritten(synth_root, tmp_path, capsys,
                                                                                  monkeypatch):  # fmt: skip
    """Another sweep (another configuration) finishes the run while this one waits for its claim: this one
    must re-check under the claim and refuse, not overwrite it or add its other seeds beside it."""
    results = tmp_path / "r"
    monkeypatch.setattr(sweep, "CLAIM_POLL_S", 0.05)
    assert main(bench_args(synth_root, tmp_path / "other", "--epochs", "3")) == 0
    theirs = (tmp_path / "other/runs/linear/svhn/final-s42.json").read_bytes()
    target = results / "runs/linear/svhn/final-s42.json"
    target.parent.mkdir(parents=True)
    # A live foreign owner (a sleeping process on this host) holds the run's claim ...
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim_file = claims.claim_path(target)
        now = time.time()
        claim_file.write_text(json.dumps({"host": os.uname().nodename, "pid": owner.pid, "slurm_job_id": None,
                                          "started": now, "heartbeat": now}))  # fmt: skip

        def finish_theirs() -> None:  # ... then writes its result and releases the claim.
            time.sleep(1.0)
            target.write_bytes(theirs)
            claim_file.unlink()

        thread = threading.Thread(target=finish_theirs)
        thread.start()
        capsys.readouterr()
        assert main(bench_args(synth_root, results, "--epochs", "2")) == 2
        thread.join()
    finally:
        owner.kill()
    one_line_error(capsys, r"final-s42.json was produced with a different configuration .*epochs: 3 -> 2")
    assert target.read_bytes() == theirs
    assert files_under(results) == ["runs/linear/final.settings", "runs/linear/svhn/final-s42.json"]


def test_leaderboard_and_compare_separate_configurations_within_a_row(tmp_path):
    results = tmp_path / "r"
    for seed in (42, 44):
        write_run(results, "vpt_deep", "dtd", seed, 60.0, protocol="final", epochs=2)
        write_run(results, "vpt_deep", "svhn", seed, 80.0, protocol="final", epochs=3)
    board = write_leaderboard(results)
    labels = sorted(board.protocol)
    assert labels == [
        "fixed-hparams-last-epoch-2seeds [recipe.epochs=2]",
        "fixed-hparams-last-epoch-2seeds [recipe.epochs=3]",
    ]
    assert sorted(board.tasks) == [1, 1]  # never one row averaging both
    from benchmark.papers.reference import load_reference
    from benchmark.report.compare import compare

    c = compare(results, load_reference(None), methods=["vpt_deep"])
    shown = {v.label() for v in c.variants}
    assert shown == set(labels)


def test_uniform_settings_and_per_task_defaults_stay_in_one_row(tmp_path):
    results = tmp_path / "r"
    for task in ("dtd", "svhn", "eurosat"):
        write_run(results, "vpt_deep", task, 42, 60.0, protocol="final", epochs=30)
    board = write_leaderboard(results)
    assert list(board.protocol) == ["fixed-hparams-last-epoch-1seed"] and int(board.tasks.iloc[0]) == 3


# -- 7. one schema for every reader ---------------------------------------------------------------------------
def _valid(tmp_path: Path) -> Path:
    results = tmp_path / "r"
    write_run(results, "vpt_deep", "dtd", 42, 60.0, protocol="final")
    write_run(results, "vpt_deep", "svhn", 42, 70.0, protocol="final")
    return results


def _broken(kind: str) -> bytes:
    good = {"schema": 1, "method": "vpt_deep", "task": "svhn", "seed": 42, "protocol": "final", "mode": "final",
            "status": "ok", "test_acc": 70.0, "config": {},
            "params": {"tunable": 1, "head": 1, "backbone": 1, "nonzero_tunable": 1}}  # fmt: skip
    if kind == "garbage":
        return b"\x00\xff\xfe garbage"
    if kind == "truncated":
        return json.dumps(good).encode()[:40]
    if kind == "empty":
        return b""
    if kind == "list":
        return b"[1, 2]"
    if kind == "missing":
        return json.dumps({k: v for k, v in good.items() if k != "seed"}).encode()
    bad = {"nan": math.nan, "null": None, "string": "70.0", "over": 170.0}[kind]
    return json.dumps({**good, "test_acc": bad}).encode()


KINDS = ["garbage", "truncated", "empty", "list", "missing", "nan", "null", "string", "over"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["leaderboard", "compare"])
def test_every_reader_refuses_a_bad_result_file_naming_it(kind, command, tmp_path, capsys):
    results = _valid(tmp_path)
    bad = results / "runs/vpt_deep/svhn/final-s42.json"
    bad.write_bytes(_broken(kind))
    before = files_under(results)
    capsys.readouterr()
    assert main([command, "--results", str(results)]) == 2
    one_line_error(capsys, re.escape(str(bad)) + r" is not a valid result file: .*; delete it")
    assert files_under(results) == before  # no half-written tables


def test_bench_resume_refuses_a_bad_result_file(synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    bad = results / "runs/linear/svhn/final-s42.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(_broken("nan").replace(b"vpt_deep", b"linear"))
    capsys.readouterr()
    assert main(bench_args(synth_root, results)) == 2
    one_line_error(capsys, r"final-s42.json is not a valid result file: its `test_acc` is nan under status ok")
    assert files_under(results) == ["runs/linear/svhn/final-s42.json"]


def test_a_result_filed_under_another_method_is_refused(tmp_path, capsys):
    results = _valid(tmp_path)
    wrong = results / "runs/convpass/svhn/final-s42.json"
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes((results / "runs/vpt_deep/svhn/final-s42.json").read_bytes())
    assert main(["leaderboard", "--results", str(results)]) == 2
    one_line_error(capsys, r"it is a result of vpt_deep/svhn, filed under convpass/svhn")


# -- 8. signals: one line, 143 / 130, nothing partial, resumable --------------------------------------------
@pytest.mark.slow
def test_a_signal_mid_run_stops_cleanly_and_the_sweep_resumes(synth_root, tmp_path):
    """SIGTERM and SIGINT, each to a sweep of its own; the two sweeps start together (their imports overlap)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        results = tmp_path / signum.name
        cmd = [sys.executable, "-m", "benchmark", *bench_args(synth_root, results, "--epochs", "40", "--lr", "0.01",
                                                               method="full", seeds="42,44")]  # fmt: skip
        procs[signum] = results, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
    for signum, (results, proc) in procs.items():
        claim = claims.claim_path(results / "runs/full/svhn/final-s42.json")
        deadline = time.monotonic() + 240
        while not claim.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert claim.exists(), proc.communicate()
        time.sleep(0.5)  # inside training
        proc.send_signal(signum)
    for signum, (results, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines[-1].startswith(f"stopped by {signal.Signals(signum).name}: finished runs are saved"), err
        assert "Traceback" not in err
        # Nothing recorded for the run in flight, no temporary file, no claim left behind (the directory's
        # settings, written before the first run, stay).
        assert files_under(results) == ["runs/full/final.settings"]
        # Resumed with fewer epochs, for speed: other settings than the directory's, which --rerun-stale replaces.
        resume = bench_args(
            synth_root, results, "--epochs", "2", "--lr", "0.01", "--rerun-stale", method="full", seeds="42"
        )
        assert main(resume) == 0
        record = json.loads((results / "runs/full/svhn/final-s42.json").read_text())
        assert record["status"] == "ok"


def test_orphans_of_a_killed_pruning_stage_are_cleaned_on_the_next_run(synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    stage = results / "runs/linear/svhn"
    stage.mkdir(parents=True)
    orphan = stage / ".dense.safetensors.tmp"
    orphan.write_bytes(b"half a checkpoint")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = claims.claim_path(stage / "final-s44.json")
    stale.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "slurm_job_id": None,
                                 "started": time.time(), "heartbeat": time.time()}))  # fmt: skip
    assert main(bench_args(synth_root, results)) == 0
    assert not orphan.exists() and not stale.exists()
    assert "left by a run that was killed" in capsys.readouterr().err


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    result = tmp_path / "x.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims.claim_path(result).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                     "started": time.time(), "heartbeat": time.time()}))  # fmt: skip
    claim = claims.try_claim(result, heartbeat=False)
    assert claim is not None and f"process {dead.pid}" in claim.reclaimed_from
    assert claims.try_claim(result, heartbeat=False) is None  # ours now, and alive
    claim.release()
    assert not claims.claim_path(result).exists()
    old = {"host": "elsewhere", "pid": 1, "started": 0.0, "heartbeat": time.time() - 2 * claims.STALE_AFTER}
    claims.claim_path(result).write_text(json.dumps(old))
    claim = claims.try_claim(result, heartbeat=False)
    assert claim is not None and "heartbeat" in claim.reclaimed_from
    claim.release()


# -- 9. a full disk ------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_leaves_nothing_partial(synth_root, tmp_path, capsys, monkeypatch):
    import tasks.atomic

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tasks.atomic.os, "fsync", full)
    results = tmp_path / "r"
    capsys.readouterr()
    assert main(bench_args(synth_root, results)) == 2
    err = one_line_error(
        capsys, r"no space left on the device writing .*final(-s42.json|.settings), \d+ MiB free there"
    )
    assert ".tmp" not in err
    assert files_under(results) == []


# -- 10, 12. bad input caught before any work ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image-size", "40"], r"--image-size 40 is not a multiple of test_vit's patch size 16; use e.g. 32"),
        (["--image-size", "8"], r"--image-size 8 is not a multiple of test_vit's patch size 16; use e.g. 16"),
        (["--seeds", "42,-1"], r"seeds must be integers from 0 to 4294967295, got -1"),
        (["--epochs", "100000000"], r"--epochs: must be an integer from 1 to 10000, got 100000000"),
    ],
)
def test_bad_values_are_refused_before_any_work(extra, message, synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    capsys.readouterr()
    assert main(bench_args(synth_root, results, *extra)) == 2
    one_line_error(capsys, message)
    assert not results.exists()


def test_run_refuses_a_negative_seed(synth_root, tmp_path, capsys):
    capsys.readouterr()
    args = argv(f"run --method linear --task svhn --data-root {synth_root} --results {tmp_path}", "--seed", "-3")
    assert main(args) == 2
    one_line_error(capsys, r"--seed: must be an integer from 0 to 4294967295, got -3")


@pytest.mark.parametrize("where", ["runs/linear/svhn/final-s42.json", "leaderboard.md", "runs/linear"])
def test_collisions_in_the_results_directory_are_caught_before_training(where, synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    spot = results / where
    if where == "runs/linear":  # a file where a directory belongs
        spot.parent.mkdir(parents=True)
        spot.write_text("not a directory")
    else:  # a directory where a file belongs
        spot.mkdir(parents=True)
    before = files_under(results)
    capsys.readouterr()
    assert main(bench_args(synth_root, results)) == 2
    one_line_error(capsys, r"is a (directory where a file|file where a directory) belongs")
    assert files_under(results) == before


def test_run_out_that_is_a_directory_is_caught_before_training(synth_root, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.mkdir()
    capsys.readouterr()
    assert main(argv(f"run --method linear --task svhn --data-root {synth_root} --out {out}")) == 2
    one_line_error(capsys, r"out.json is a directory where the result file belongs")
