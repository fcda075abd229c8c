"""The SLURM driver against the real local cluster and against fake executors: a job that can never start and
a job sbatch refuses end the sweep in one line with the sweep's jobs cancelled; a task's next stage goes out
as soon as its own runs end; the sweep never has more jobs in flight than --slurm-array-parallelism."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.sweep.slurm import Queue
from benchmark.sweep.worker import Worker
from tests.test_launch import bench_args, leftovers, one_thread, slurm_unavailable, starts_and_ends  # noqa: F401

# Old code waited forever for a job that cannot start: the test fails instead of hanging.
WATCHDOG_S = 240


@pytest.fixture
def watchdog():
    def expire(signum, frame):
        raise TimeoutError(f"the driver was still waiting after {WATCHDOG_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(WATCHDOG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def slurm(monkeypatch):
    if why := slurm_unavailable():
        pytest.skip(why)
    monkeypatch.setattr("benchmark.sweep.driver.SLURM_POLL_S", 1.0, raising=False)


def submitted_ids(results: Path) -> set[str]:
    """The SLURM job ids this sweep submitted, from submitit's files in its log folder."""
    return {m.group(1) for p in (results / "logs").rglob("*") if (m := re.match(r"(\d+)(?:_\d+)*_", p.name))}


def queued_ids() -> set[str]:
    out = subprocess.run(["squeue", "--me", "-h", "--array", "-o", "%i"], capture_output=True, text=True, check=True)
    return {line.split("_")[0] for line in out.stdout.split()}


SLURM_CPU = ["--launcher", "slurm", "--slurm-gpus-per-job", "0", "--slurm-time", "10", "--threads", "1"]


@pytest.mark.slow
def test_a_job_that_can_never_start_ends_the_sweep_in_one_line(slurm, watchdog, synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon", synth_root, results, "--seeds", "42,44", *SLURM_CPU,
                      "--slurm-cpus-per-job", "8")  # fmt: skip  # the node here has 2
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "runs go to SLURM" in err[0], err  # the driver's announcement, then the error
    assert "can never start (pending: PartitionConfig)" in err[1] and "--slurm-cpus-per-job" in err[1]
    ids = submitted_ids(results)
    assert ids and not ids & queued_ids()
    assert not leftovers(results)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "option"),
    [(["--slurm-gpus-per-job", "1"], "--slurm-gpus-per-job 0"), (["--slurm-partition", "nope"], "--slurm-partition")],
)
def test_a_job_sbatch_refuses_ends_the_sweep_in_one_line(slurm, watchdog, synth_root, tmp_path, capsys, extra, option):
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon", synth_root, results, *SLURM_CPU, "--slurm-cpus-per-job", "1", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sbatch refused the job") and option in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not list((results / "runs").rglob("*.json"))


class SyncJob:
    """A job that runs its worker in this process: at once, or, when `hold` is given, only once `hold` is set
    (until then it has not ended)."""

    def __init__(self, ctx, runs, offset, hold: threading.Event | None = None) -> None:
        self.args, self.hold, self.ran = (ctx, runs, offset), hold, False
        self.job_id = f"sync-{id(self)}"
        self.paths = type("Paths", (), {"result_pickle": Path("/nonexistent")})()

    def done(self) -> bool:
        if self.hold is not None and not self.hold.is_set():
            return False
        if not self.ran:
            self.ran = True
            self.result_value = Worker()(*self.args)
        return True

    def result(self):
        return self.result_value

    def stderr(self) -> str:
        return ""

    def cancel(self, check: bool = True) -> None:
        pass


@pytest.mark.usefixtures("one_thread")
def test_a_tasks_next_stage_goes_out_while_other_tasks_still_run(synth_root, tmp_path, monkeypatch):
    """Grid on two tasks: camelyon's final run is submitted while svhn's grid points are still running."""
    submissions: list[list[str]] = []
    svhn_held = threading.Event()
    polls = [0]

    def submit(executor, launch, ctx, wave):
        submissions.append(sorted(f"{j.spec.task.id}/{j.path.name}" for j in wave))
        if any(j.spec.task.id == "camelyon" and j.path.name.startswith("grid-s") for j in wave):
            svhn_held.set()  # the next stage of camelyon went out: svhn's grid may end now
        by_task = {}
        for j in wave:
            by_task.setdefault(j.spec.task.id, []).append(j)
        return [SyncJob(ctx, runs, 0, hold=svhn_held if task == "svhn" else None) for task, runs in by_task.items()]

    def sleep(seconds):
        polls[0] += 1
        if polls[0] > 200:  # a driver that waits for svhn before going on would wait forever: let it end
            svhn_held.set()

    monkeypatch.setattr("benchmark.sweep.driver._submit", submit)
    monkeypatch.setattr("benchmark.sweep.driver.time", types.SimpleNamespace(sleep=sleep))  # the driver's polls
    grid = ["--protocol", "grid", "--lr-grid", "0.05,0.5", "--wd-grid", "0", "--seeds", "42"]
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon,svhn", synth_root, results, *grid, "--launcher", "local",
                      "--workers", "2", "--threads", "1")  # fmt: skip
    assert main(args) == 0
    camelyon_final = next(i for i, s in enumerate(submissions) if "camelyon/grid-s42.json" in s)
    svhn_final = next(i for i, s in enumerate(submissions) if "svhn/grid-s42.json" in s)
    assert camelyon_final < svhn_final and polls[0] <= 200, (submissions, polls)
    assert main(bench_args("linear", "camelyon,svhn", synth_root, tmp_path / "inline", *grid)) == 0
    for task in ("camelyon", "svhn"):  # the same results as one after another
        pipelined, inline = (json.loads((r / f"runs/linear/{task}/grid-s42.json").read_text())
                             for r in (results, tmp_path / "inline"))  # fmt: skip
        assert pipelined["status"] == "ok" and pipelined["selection"] == inline["selection"]
        assert (pipelined["test_acc"], pipelined["train_loss"]) == (inline["test_acc"], inline["train_loss"])


class FakeSlurmExecutor:
    """submitit's SLURM executor, minus SLURM: every array task runs at once in this process."""

    def __init__(self) -> None:
        self.arrays: list[int] = []

    def map_array(self, fn, ctxs, runs, offsets):
        self.arrays.append(len(runs))
        return [SyncJob(c, r, o) for c, r, o in zip(ctxs, runs, offsets, strict=True)]


@pytest.mark.usefixtures("one_thread")
def test_the_sweep_keeps_at_most_array_parallelism_jobs_in_flight(synth_root, tmp_path, monkeypatch):
    executor = FakeSlurmExecutor()
    monkeypatch.setattr("benchmark.sweep.executors.check_slurm", lambda: None)
    monkeypatch.setattr("benchmark.sweep.driver.make_executor", lambda *a: executor)
    monkeypatch.setattr("benchmark.sweep.driver.Queue", lambda strict: Queue(), raising=False)  # no squeue needed
    monkeypatch.setattr("benchmark.sweep.driver.SLURM_POLL_S", 0.0, raising=False)
    monkeypatch.setattr("benchmark.sweep.driver.MAX_ARRAY", 2)
    results = tmp_path / "r"
    seeds = ["--seeds", "1,2,3,4,5,6,7"]
    args = bench_args("linear", "camelyon", synth_root, results, *seeds, "--launcher", "slurm",
                      "--slurm-gpus-per-job", "0", "--slurm-array-parallelism", "3", "--runs-per-job", "2")  # fmt: skip
    assert main(args) == 0
    assert max(executor.arrays) <= 2 and sum(executor.arrays) == 4  # 7 runs, 2 per job: 4 jobs
    assert len(executor.arrays) >= 2 and sum(executor.arrays[:2]) <= 3  # 3 jobs first, the 4th once one ended
    assert len(list((results / "runs").rglob("final-s*.json"))) == 7


def fake_slurm(monkeypatch) -> tuple[FakeSlurmExecutor, dict]:
    """The slurm launcher with `FakeSlurmExecutor`; returns it and the parameters it was made with."""
    executor, params = FakeSlurmExecutor(), {}

    def make(launcher, folder, parameters, name):
        params.update(parameters)
        return executor

    monkeypatch.setattr("benchmark.sweep.executors.check_slurm", lambda: None)
    monkeypatch.setattr("benchmark.sweep.driver.make_executor", make)
    monkeypatch.setattr("benchmark.sweep.driver.Queue", lambda strict: Queue())  # no squeue needed
    monkeypatch.setattr("benchmark.sweep.driver.SLURM_POLL_S", 0.0)
    return executor, params


@pytest.mark.usefixtures("one_thread")
def test_node_mode_packs_runs_into_one_job_with_a_worker_per_gpu(synth_root, tmp_path, monkeypatch):
    executor, params = fake_slurm(monkeypatch)
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon", synth_root, results, "--seeds", "1,2,3,4,5,6,7,8,9", "--launcher",
                      "slurm", "--slurm-gpus-per-job", "8", "--runs-per-job", "16", "--logger", "none")  # fmt: skip
    assert main(args) == 0
    assert executor.arrays == [1]  # 9 runs, up to 16 per job: one job
    assert params["ntasks_per_node"] == 8 and params["gpus_per_task"] == 1 and "gpus_per_node" not in params
    assert params["cpus_per_task"] == 8 and params["time"] == 240 * 2  # 8 per GPU; 2 runs per worker
    finals = list((results / "runs").rglob("final-s*.json"))
    assert len(finals) == 9
    # The job's workers trained under the sweep's logger, as recorded: none, so no log folder beside any result.
    assert all(json.loads(p.read_text())["config"]["logger"] == "none" for p in finals)
    assert not list((results / "runs").rglob("*.logs"))


def test_each_task_of_a_node_mode_job_starts_at_its_own_share(monkeypatch):
    from benchmark.sweep.worker import task_offset

    for name, value in (("SUBMITIT_EXECUTOR", "slurm"), ("SLURM_JOB_ID", "5"), ("SLURM_NTASKS", "8"),
                        ("SLURM_PROCID", "3")):  # fmt: skip
        monkeypatch.setenv(name, value)
    assert task_offset(64) == 24
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert task_offset(64) == 0


def test_bad_packing_options_are_refused_before_anything(synth_root, tmp_path, monkeypatch, capsys):
    fake_slurm(monkeypatch)
    results = tmp_path / "r"
    for extra, message in (
        (
            ["--launcher", "slurm", "--slurm-gpus-per-job", "8", "--runs-per-job", "4"],
            "leaves GPUs of a 8-GPU job idle",
        ),
        (["--launcher", "local", "--runs-per-job", "4"], "--runs-per-job needs --launcher slurm"),
        (["--launcher", "slurm", "--runs-per-job", "0"], "must be a positive integer"),
    ):
        assert main(bench_args("linear", "camelyon", synth_root, results, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not results.exists()


def test_a_refused_submission_cancels_the_jobs_already_submitted(synth_root, tmp_path, monkeypatch, capsys):
    import submitit

    executor, _ = fake_slurm(monkeypatch)
    held = threading.Event()  # the first jobs never end: they are in flight when the refusal comes
    cancelled: list[str] = []

    def map_array(fn, ctxs, runs, offsets):
        if executor.arrays:
            raise submitit.core.utils.FailedJobError(
                "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, "
                "user's size and/or time limits)"
            )
        executor.arrays.append(len(runs))
        return [SyncJob(c, r, o, hold=held) for c, r, o in zip(ctxs, runs, offsets, strict=True)]

    executor.map_array = map_array
    monkeypatch.setattr("benchmark.sweep.driver.MAX_ARRAY", 1)
    monkeypatch.setattr("benchmark.sweep.driver.cancel", cancelled.extend)
    monkeypatch.setattr("benchmark.sweep.jobs.cancel", cancelled.extend)
    results = tmp_path / "r"
    args = bench_args("linear", "camelyon", synth_root, results, "--seeds", "1,2", "--launcher", "slurm")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "sbatch refused the job" in err[-1] and "--slurm-array-parallelism" in err[-1]
    assert len(cancelled) == 1 and cancelled[0].startswith("sync-")  # the first array's job


def test_squeue_failing_mid_sweep_ends_the_driver_in_one_line(synth_root, tmp_path, monkeypatch, capsys):
    executor, _ = fake_slurm(monkeypatch)
    executor.map_array = lambda fn, ctxs, runs, offsets: [SyncJob(c, r, o, hold=threading.Event())
                                                          for c, r, o in zip(ctxs, runs, offsets, strict=True)]  # fmt: skip
    monkeypatch.setattr("benchmark.sweep.driver.Queue", lambda strict: Queue(strict=strict, sleep=lambda s: None))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = bench_args("linear", "camelyon", synth_root, tmp_path / "r", "--launcher", "slurm")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: squeue failed 4 times (slurm_load_jobs error: Socket timed out)"), err


@pytest.mark.slow
def test_a_queued_job_has_not_ended_until_it_leaves_the_queue(slurm, tmp_path):
    import submitit

    from benchmark.sweep.executors import job_finished

    out = subprocess.run(["sbatch", "--parsable", "--hold", "-c", "1", "--array", "0-1", "-o", "/dev/null", "--wrap",
                          "true"], capture_output=True, text=True, check=True)  # fmt: skip
    since, array = time.time(), out.stdout.strip().split(";")[0]
    job = submitit.SlurmJob(tmp_path, f"{array}_1")
    queue = Queue(strict=True, max_age=0.0)
    try:
        assert not job_finished(job, queue, since)  # pending (held)
    finally:
        subprocess.run(["scancel", array], check=True)
    deadline = time.monotonic() + 60
    while not job_finished(job, queue, since):
        assert time.monotonic() < deadline, "the cancelled job is still queued"
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_tasks_of_one_job_share_its_runs(slurm, watchdog, synth_root, tmp_path, monkeypatch):
    """Node mode's job shape on a CPU cluster: 2 tasks per job (one per GPU there) share the job's 4 runs;
    every run is executed once, by one of them, and the driver waits for both."""
    from benchmark.sweep import launch as launch_module

    real = launch_module.launch_options

    def two_tasks(args):
        launch = real(args)
        return dataclasses.replace(launch, slurm={**launch.slurm, "ntasks_per_node": 2}, runs_per_job=4)

    monkeypatch.setattr(launch_module, "launch_options", two_tasks)
    results = tmp_path / "r"
    seeds = ["--seeds", "1,2,3,4", "--logger", "tensorboard"]
    assert (
        main(bench_args("linear", "camelyon", synth_root, results, *seeds, *SLURM_CPU, "--slurm-cpus-per-job", "1"))
        == 0
    )
    starts, ends, skips = starts_and_ends(results)
    finals = sorted(str(p) for p in (results / "runs").rglob("final-s*.json"))
    assert len(finals) == 4 and set(ends) == set(finals) and set(ends.values()) == {1} and starts == ends + skips
    tasks = {p.name.split("_")[-2] for p in (results / "logs").rglob("*_result.pkl")}
    assert tasks == {"0", "1"}  # both tasks of the job ran to the end before the driver went on
    assert main(bench_args("linear", "camelyon", synth_root, tmp_path / "inline", *seeds)) == 0
    for seed in (1, 2, 3, 4):
        a, b = (
            json.loads((r / f"runs/linear/camelyon/final-s{seed}.json").read_text())
            for r in (results, tmp_path / "inline")
        )
        assert (a["status"], a["test_acc"], a["train_loss"]) == (b["status"], b["test_acc"], b["train_loss"])
        assert a["config"]["logger"] == "tensorboard"  # the jobs logged through it, beside each result
        assert list((results / f"runs/linear/camelyon/final-s{seed}.logs").glob("events.out.tfevents.*"))
