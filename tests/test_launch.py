"""The local and slurm launchers: the same results as inline, no run lost or run twice when drivers or
workers are killed or run side by side, and every bad launcher option refused before anything starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmark.cli import main
from benchmark.sweep.decisions import read_candidates
from methods import get_method
from tests.conftest import argv

PROJECT = Path(__file__).resolve().parent.parent
# Per method: tasks and options of a small sweep that still has every stage of the method's pipeline.
PIPELINES = {
    "linear": ("camelyon,svhn", ["--seeds", "42,44"]),
    "vpt_deep": ("camelyon", ["--protocol", "grid", "--lr-grid", "0.05,0.5", "--wd-grid", "0", "--seeds", "42",
                              "--set", "num_tokens=4"]),
    "e2vpt": ("camelyon", ["--seeds", "42", "--set", "max_token_levels=2", "--set", "max_segment_levels=2"]),
    "lion": ("camelyon", ["--seeds", "42", "--lr", "0.01"]),
    # FGVC: VPT's splits and random crops and flips drawn in the worker, as inline.
    "vpt_deep_fgvc": ("oxfordflowers", ["--suite", "fgvc", "--seeds", "42", "--set", "num_tokens=2"]),
    # Swin: E2VPT's pruning pipeline with prompts beside the feature map, and the Swin prompt options, in the worker;
    # its curves through TensorBoard.
    "e2vpt_swin": ("camelyon", ["--backbone", "peft_bench_tiny_swin", "--seeds", "42", "--set", "max_token_levels=2",
                                "--set", "max_segment_levels=2", "--set", "num_tokens=4", "--set", "pool=image",
                                "--set", "window_order=per_sample", "--logger", "tensorboard"]),
}  # fmt: skip


def bench_args(method: str, tasks: str, root: Path, results: Path, *extra: str) -> list[str]:
    return argv(f"bench --method {method} --tasks {tasks} --data-root {root} --results {results}",
                "--epochs", "2", "--batch-size", "32", *extra)  # fmt: skip


def outcomes(results: Path) -> dict[str, tuple]:
    """Every result file under `results/runs` by path: what a launcher must not change."""
    out = {}
    for path in sorted((results / "runs").rglob("*.json")):
        r = json.loads(path.read_text())
        if isinstance(r, list) or "status" not in r:  # a pruning stage's candidates, a decision file
            out[str(path.relative_to(results))] = json.dumps(r, sort_keys=True)
            continue
        out[str(path.relative_to(results))] = (
            r["status"], r["test_acc"], r["val_acc"], json.dumps(r["params"]), json.dumps(r["selection"]),
            json.dumps(r["pruning"], sort_keys=True), r["train_loss"], json.dumps(r["config"], sort_keys=True),
        )  # fmt: skip
    return out


def starts_and_ends(results: Path) -> tuple[Counter, Counter, Counter]:
    """How often each run was started, executed to the end, and left to another process that had claimed it
    first (waiting for its result), from the workers' logs."""
    text = "\n".join(p.read_text() for p in (results / "logs").rglob("*_log.err"))
    return (
        Counter(re.findall(r"^peft-bench: run (\S+)$", text, re.M)),
        Counter(re.findall(r"^peft-bench: done (\S+) \w+$", text, re.M)),
        Counter(re.findall(r"^peft-bench: skipped (\S+) ", text, re.M)),
    )


def executed(out: str) -> int:
    """The `N run(s) executed` of a sweep's closing line."""
    return int(re.search(r"^(\d+) run\(s\) executed", out, re.M).group(1))


def leftovers(results: Path) -> list[Path]:
    return [p for p in results.rglob("*") if p.suffix in (".claim", ".tmp")]


@pytest.fixture
def one_thread():
    """Inline runs with one torch thread, as each worker has: reductions split over other thread counts may
    round differently (LION's equilibrium solver shows it in the 5th digit of a loss)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def driver(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow
# A plain sweep and a pruning pipeline (the grid's pipeline goes through the same driver and workers in the slurm
# launcher's test below).
# E2VPT's pruning pipeline runs on the tiny Swin here (the ViT's is the same pipeline of the same driver and workers).
@pytest.mark.parametrize("pipeline", ["linear", "vpt_deep_fgvc", "e2vpt_swin"])
def test_local_workers_give_the_inline_results(pipeline, synth_root, fgvc_synth_root, tmp_path, one_thread,
                                               monkeypatch):  # fmt: skip
    tasks, extra = PIPELINES[pipeline]
    method = pipeline.removesuffix("_fgvc").removesuffix("_swin")
    if pipeline.endswith("_fgvc"):
        synth_root = fgvc_synth_root
    assert main(bench_args(method, tasks, synth_root, tmp_path / "inline", *extra)) == 0
    local = tmp_path / "local"
    workers = ["--launcher", "local", "--workers", "2", "--threads", "1"]

    def not_here(self, *args, **kwargs):
        raise AssertionError("the driver computed a pruning decision")

    # Under `--launcher local` the masks are computed by a worker process on its device; the driver only reads
    # the decision file back (it would fail here if it computed them).
    monkeypatch.setattr(get_method("e2vpt"), "prune_candidates", not_here)
    assert main(bench_args(method, tasks, synth_root, local, *extra, *workers)) == 0
    assert outcomes(local) == outcomes(tmp_path / "inline")
    if pipeline == "vpt_deep_fgvc":
        record = json.loads((local / "runs/vpt_deep/oxfordflowers/final-s42.json").read_text())
        assert record["config"]["preprocessing"]["augment"] == "crop_flip"
        assert record["data"]["train_split"]["name"] == "train" and record["status"] == "ok"
    if pipeline == "e2vpt_swin":  # the recorded config is the one the workers trained, options included
        record = json.loads((local / "runs/e2vpt/camelyon/final-s42.json").read_text())
        assert record["config"]["backbone"] == "peft_bench_tiny_swin" and record["status"] == "ok"
        trained = record["config"]["method_config"]
        assert (trained["pool"], trained["window_order"], trained["num_tokens"]) == ("image", "per_sample", 4)
        assert record["config"]["logger"] == "tensorboard"  # and the workers logged through it, beside each result
        assert list((local / "runs/e2vpt/camelyon/final-s42.logs").glob("events.out.tfevents.*"))
    if pipeline == "linear":  # the default logger's metrics, written by the workers beside each result
        for path in (local / "runs").rglob("final-s*.json"):
            assert json.loads(path.read_text())["config"]["logger"] == "csv"
            assert (path.parent / f"{path.stem}.logs" / "metrics.csv").is_file()
    if method == "e2vpt":
        assert any("final-prune" in p for p in outcomes(local))
        stored = read_candidates(local / "runs/e2vpt/camelyon/decisions/final-prune-candidates.safetensors")
        rewind = json.loads(min((local / "runs/e2vpt/camelyon/final-prune").glob("rewind-*.json")).read_text())
        assert rewind["config"]["decisions"] == {"candidates": stored.sha256}
    starts, ends, skips = starts_and_ends(local)
    assert set(ends.values()) == {1} and starts == ends + skips
    assert not leftovers(local)


SLOW_RUNS = ["--set", "num_tokens=4", "--epochs", "6", "--seeds", "42,44,82,100", "--launcher", "local",
             "--workers", "2"]  # fmt: skip


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def alive_owner(claim: Path) -> int | None:
    """The pid of a claim's owner, while the claim exists and is readable (it may be released or being written)."""
    try:
        return json.loads(claim.read_text())["pid"]
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.slow
def test_killed_worker_then_killed_driver_lose_and_repeat_nothing(synth_root, tmp_path):
    """One sweep, two kills: a worker in the middle of a run (another worker takes the run over), then the driver
    while its workers run (they go on; the same command, run again, waits for them and submits what is missing).
    Only the killed worker's run is started twice; every run is executed exactly once."""
    results = tmp_path / "r"
    args = bench_args("vpt_deep", "camelyon,svhn", synth_root, results, *SLOW_RUNS)
    proc = driver(args)
    claims = lambda: list((results / "runs").glob("*/*/*.json.claim"))  # noqa: E731  (runs in flight)
    wait_for(lambda: any(alive_owner(c) for c in claims()) or proc.poll() is not None)
    assert proc.poll() is None, proc.stdout.read()
    victim = next(c for c in claims() if alive_owner(c))
    killed = alive_owner(victim)
    os.kill(killed, signal.SIGKILL)
    # Another worker takes the killed run's claim over (each local worker walks the whole wave; the driver submits
    # the run again if none does).
    wait_for(lambda: alive_owner(victim) not in (None, killed) or proc.poll() is not None)
    assert proc.poll() is None, proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(args) == 0  # run again: submits only what is missing, waits for what others still run
    finals = sorted((results / "runs").rglob("final-s*.json"))
    assert len(finals) == 8 and all(json.loads(p.read_text())["status"] == "ok" for p in finals)
    starts, ends, skips = starts_and_ends(results)
    assert set(ends) == {str(p) for p in finals} and set(ends.values()) == {1}  # each executed exactly once
    # Only the killed worker's run started twice (the killed driver's runs were waited for, not started again).
    assert starts - ends - skips == Counter({str(victim.with_suffix("")): 1}), (starts, ends, skips)
    assert starts.total() - ends.total() - skips.total() == 1
    assert not leftovers(results)


@pytest.mark.slow
def test_two_drivers_at_once_run_every_run_exactly_once(synth_root, tmp_path):
    results = tmp_path / "r"
    args = bench_args("vpt_deep", "camelyon,svhn", synth_root, results, *SLOW_RUNS)
    procs = [driver(args), driver(args)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    finals = sorted((results / "runs").rglob("final-s*.json"))
    starts, ends, skips = starts_and_ends(results)
    assert len(finals) == 8 and set(ends) == {str(p) for p in finals}
    assert sum(executed(out) for out in outs) == 8, outs  # each counts only the runs its own workers executed
    assert set(ends.values()) == {1} and starts == ends + skips  # each executed once, by one of the drivers
    assert not leftovers(results)


def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (bash .ci/slurm-up.sh brings up a local cluster, as root)"
    out = subprocess.run(["sinfo", "--noheader", "--states=idle,mix,alloc", "-o", "%n"], capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0 or not out.stdout.strip():
        return f"no SLURM node is up ({(out.stderr or 'sinfo lists no idle node').strip()}); run .ci/slurm-up.sh"
    return None


@pytest.mark.slow
def test_slurm_launcher_gives_the_inline_results(synth_root, tmp_path, one_thread):
    if why := slurm_unavailable():
        pytest.skip(why)
    tasks, extra = PIPELINES["vpt_deep"]
    assert main(bench_args("vpt_deep", tasks, synth_root, tmp_path / "inline", *extra)) == 0
    results = tmp_path / "slurm"
    slurm = ["--launcher", "slurm", "--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1", "--slurm-time", "20",
             "--threads", "1"]  # fmt: skip
    assert main(bench_args("vpt_deep", tasks, synth_root, results, *extra, *slurm)) == 0
    assert outcomes(results) == outcomes(tmp_path / "inline")
    finals = [p for p in (results / "runs").rglob("grid-s*.json") if p.parent.name != "decisions"]
    assert finals and all((p.parent / f"{p.stem}.logs" / "metrics.csv").is_file() for p in finals)  # from the jobs
    assert list((results / "logs").rglob("*_log.err"))
    assert not leftovers(results)


def test_bad_launcher_options_are_refused_before_anything(synth_root, tmp_path, capsys, monkeypatch):
    results = tmp_path / "r"
    for extra, message in (
        (["--launcher", "mpi"], "invalid choice: 'mpi'"),
        (["--launcher", "local", "--workers", "0"], "must be a positive integer"),
        (["--launcher", "local", "--runs-per-gpu", "2"], "none is visible"),
        (["--launcher", "local", "--slurm-partition", "gpu"], "--slurm-partition needs --launcher slurm"),
        (["--workers", "2"], "--workers needs --launcher local"),
        (["--launcher", "slurm", "--slurm-time", "soon"], "--slurm-time takes"),
    ):
        if "--runs-per-gpu" in extra:
            monkeypatch.setattr("benchmark.sweep.launch.visible_gpus", lambda: [])
        if "--slurm-time" in extra:
            monkeypatch.setattr("benchmark.sweep.executors.check_slurm", lambda: None)
        assert main(bench_args("linear", "camelyon", synth_root, results, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        monkeypatch.undo()
    assert not results.exists()


def test_missing_or_unreachable_slurm_is_refused(synth_root, tmp_path, capsys, monkeypatch):
    results = tmp_path / "r"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch
    assert main(bench_args("linear", "camelyon", synth_root, results, "--launcher", "slurm")) == 2
    assert "no sbatch on PATH" in capsys.readouterr().err
    for name, script in (("sbatch", "exit 0"), ("sinfo", "echo 'Unable to contact slurm controller' >&2; exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    assert main(bench_args("linear", "camelyon", synth_root, results, "--launcher", "slurm")) == 2
    err = capsys.readouterr().err.strip()
    assert "Unable to contact slurm controller" in err and len(err.splitlines()) == 1
    assert not results.exists()


def test_reproduce_plan_shows_the_graph_of_runs_and_decisions(capsys):
    assert main(["reproduce", "--method", "e2vpt", "--tasks", "svhn", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "1. grid points (train800 → val200): 40 runs" in out
    assert "2. dense runs of the pruning stage: 1 runs" in out
    assert "4. final seeds (train800val200 → test): 5 runs" in out
    # The decisions between the stages, each a file the runs after it are tied to.
    assert "→ decision: the grid's winner (grid-selection.json)" in out
    assert "computed by a worker on its device (grid-prune-candidates.safetensors)" in out
    assert "→ decision: the chosen candidate (grid-prune-choice.json)" in out


def test_a_run_inside_a_slurm_job_stays_one_silent_single_device_process(synth_root, tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "peft", "SLURM_NODELIST": "x",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    args = argv(f"run --method linear --task camelyon --data-root {synth_root} --results {tmp_path}", "--epochs", "1")
    out = subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=PROJECT, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "srun" not in out.stderr and "SLURM" not in out.stderr, out.stderr


class _DeadJob:
    """A submitted job whose worker died before writing anything (as after an out-of-memory kill)."""

    job_id = "1234"
    paths = type("Paths", (), {"result_pickle": Path("/nonexistent/result.pkl")})()

    def done(self) -> bool:
        return True

    def stderr(self) -> str:
        return "loading...\nRuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"

    def cancel(self, check: bool = True) -> None:
        pass


def test_a_run_whose_worker_dies_twice_is_recorded_failed_with_the_cause(synth_root, tmp_path, monkeypatch, capsys):
    submitted = []

    def submit(executor, launch, ctx, wave):
        submitted.append(sorted(j.path.name for j in wave))
        return [_DeadJob()]

    monkeypatch.setattr("benchmark.sweep.driver._submit", submit)
    monkeypatch.setattr("benchmark.sweep.driver.POLL_S", 0.01)
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon", synth_root, results, "--seeds", "42,44", "--launcher", "local")
    assert main(args) == 0
    assert submitted == [["final-s42.json", "final-s44.json"]] * 2  # submitted, then once again
    for seed in (42, 44):
        r = json.loads((results / f"runs/linear/camelyon/final-s{seed}.json").read_text())
        assert r["status"] == "failed" and r["test_acc"] is None
        assert "died, twice" in r["error"] and "CUDA out of memory" in r["error"]
        assert "CUDA out of memory" in r["traceback"] and r["config"]["seed"] == seed
    err = capsys.readouterr().err
    assert "submitted again" in err and "recorded as failed" in err
    assert not leftovers(results)
