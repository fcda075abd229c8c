"""Claims and the SLURM queue they ask: one squeue for any number of claims, a requeued job's own claim, a
race-free takeover, and squeue's output formats, failures and pending reasons."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.core.errors import UserError
from benchmark.sweep import claims
from benchmark.sweep.claims import claim_path, clean_orphans, read_owner, stale_reason, try_claim
from benchmark.sweep.slurm import Queue, expand_ids, never_starts, parse_squeue, rejection, sharing


def fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> Path:
    """An `squeue` on PATH that prints `lines` (whatever it is asked) and logs each call; returns the log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "squeue.log"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nprintf '%s\\n' {' '.join(repr(x) for x in lines)}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    log.touch()
    return log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines())


def write_claim(result: Path, **owner) -> Path:
    now = time.time()
    owner = {"host": "node-a", "pid": 4321, "user": getpass.getuser(), "slurm_job_id": None, "started": now,
             "heartbeat": now, **owner}  # fmt: skip
    path = claim_path(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner))
    return path


def test_claims_on_other_hosts_cost_one_squeue_whatever_their_number(tmp_path, monkeypatch):
    running = [f"900_{i} RUNNING None" for i in range(0, 50, 2)]  # the odd tasks have left the queue
    log = fake_squeue(tmp_path, monkeypatch, running)
    long_ago = time.time() - 600  # started well before the snapshot: the snapshot can judge them
    paths = [write_claim(tmp_path / f"r{i}.json", slurm_job_id=f"900_{i}", started=long_ago) for i in range(50)]
    with sharing(Queue()):
        reasons = [stale_reason(read_owner(p)) for p in paths]
    assert calls(log) == 1
    assert reasons[0::2] == [None] * 25
    assert all("900_" in r and "left the queue" in r for r in reasons[1::2])


def test_a_claim_newer_than_the_snapshot_is_not_judged_by_it(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, [])  # the job was submitted after this snapshot
    with sharing(Queue()):
        assert stale_reason(read_owner(write_claim(tmp_path / "r.json", slurm_job_id="901_0"))) is None


def test_another_users_job_is_judged_by_its_heartbeat_only(tmp_path, monkeypatch):
    log = fake_squeue(tmp_path, monkeypatch, [])
    path = write_claim(tmp_path / "r.json", slurm_job_id="902_0", user="someone-else", started=0.0)
    with sharing(Queue()):
        assert stale_reason(read_owner(path)) is None  # `squeue --me` cannot see it
    assert calls(log) == 0


def test_a_requeued_job_takes_its_own_old_claim_back(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, ["4242_3 RUNNING None"])  # the job runs again: that is us
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = tmp_path / "r.json"
    write_claim(result, host="node-b", pid=77, slurm_job_id="4242_3")  # before the requeue: no restart count
    with sharing(Queue()):
        claim = try_claim(result, heartbeat=False)
    assert claim is not None and "requeued" in claim.reclaimed_from
    assert read_owner(claim_path(result))["pid"] == os.getpid()
    claim.release()
    # A sibling of the same incarnation (another task of this job, node mode) keeps its claim.
    write_claim(result, host="node-b", pid=78, slurm_job_id="4242_3", slurm_restarts=1)
    with sharing(Queue()):
        assert try_claim(result, heartbeat=False) is None


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def replaced_meanwhile(monkeypatch, path: Path, fresh: dict) -> None:
    """Between the judgment "stale" and the takeover's rename, another process replaces the stale claim with
    its own fresh one (as a concurrent `try_claim` does)."""
    judge = claims.stale_reason

    def interleaved(owner, **kwargs):
        why = judge(owner, **kwargs)
        if why is not None and owner.get("pid") != fresh["pid"]:
            path.unlink()
            path.write_text(json.dumps(fresh))
        return why

    monkeypatch.setattr(claims, "stale_reason", interleaved)


def test_taking_over_a_stale_claim_leaves_a_newer_live_claim_in_place(tmp_path, monkeypatch, live_process):
    result = tmp_path / "r.json"
    path = write_claim(result, host=socket.gethostname(), pid=dead_pid())
    now = time.time()
    fresh = {"host": socket.gethostname(), "pid": live_process, "started": now, "heartbeat": now}
    replaced_meanwhile(monkeypatch, path, fresh)
    assert try_claim(result, heartbeat=False) is None  # the newer owner is live: not ours to take
    assert json.loads(path.read_text()) == fresh
    assert not list(tmp_path.glob(".*stale*"))


def test_cleaning_orphans_leaves_a_newer_live_claim_in_place(tmp_path, monkeypatch, live_process):
    path = write_claim(tmp_path / "runs" / "r.json", host=socket.gethostname(), pid=dead_pid())
    now = time.time()
    fresh = {"host": socket.gethostname(), "pid": live_process, "started": now, "heartbeat": now}
    replaced_meanwhile(monkeypatch, path, fresh)
    assert clean_orphans(tmp_path / "runs") == []
    assert json.loads(path.read_text()) == fresh


def test_a_stale_claim_is_taken_over_when_nobody_interferes(tmp_path):
    result = tmp_path / "r.json"
    write_claim(result, host=socket.gethostname(), pid=dead_pid())
    claim = try_claim(result, heartbeat=False)
    assert claim is not None and "is gone" in claim.reclaimed_from
    claim.release()
    write_claim(result, host=socket.gethostname(), pid=dead_pid())
    assert clean_orphans(tmp_path) == [claim_path(result)] and not claim_path(result).exists()


def test_squeue_formats_are_read_job_by_job():
    assert expand_ids("123") == ["123"] and expand_ids("123_4") == ["123_4"]
    assert expand_ids("7_[0-2,5%2]") == ["7_0", "7_1", "7_2", "7_5"]
    jobs = parse_squeue("7_[0-1%2] PENDING PartitionConfig\n8_3 RUNNING None\n"
                        "9 PENDING ReqNodeNotAvail, UnavailableNodes:node[1-3]\n")  # fmt: skip
    assert jobs["7_1"].reason == "PartitionConfig" and jobs["8_3"].state == "RUNNING"
    assert jobs["9"].reason == "ReqNodeNotAvail, UnavailableNodes:node[1-3]"


class FakeRun:
    """`subprocess.run` for squeue: fails `failures` times, then answers; counts calls."""

    def __init__(self, failures: int, stdout: str = "") -> None:
        self.failures, self.stdout, self.calls = failures, stdout, 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Unable to contact slurm controller")
        return subprocess.CompletedProcess(cmd, 0, self.stdout, "")


def test_the_snapshot_is_refreshed_once_per_interval_and_retried_with_back_off():
    clock, slept = [0.0], []
    run = FakeRun(failures=2, stdout="5 RUNNING None\n")
    queue = Queue(max_age=20, strict=True, run=run, clock=lambda: clock[0], wall=lambda: 1000.0 + clock[0],
                  sleep=slept.append)  # fmt: skip
    assert queue.gone("5", since=0.0) is None and queue.gone("6", since=0.0) is not None
    assert run.calls == 3 and slept == [2.0, 4.0]  # two failures, then an answer
    for t in (5.0, 10.0, 19.9):
        clock[0] = t
        queue.gone("5", since=0.0)
    assert run.calls == 3
    clock[0] = 20.0
    queue.gone("5", since=0.0)
    assert run.calls == 4


def test_squeue_failing_for_good_is_one_line():
    queue = Queue(strict=True, run=FakeRun(failures=99), sleep=lambda s: None)
    with pytest.raises(UserError) as e:
        queue.snapshot()
    assert "squeue failed 4 times" in str(e.value) and "Unable to contact" in str(e.value)
    assert "\n" not in str(e.value)
    assert Queue(strict=False, run=FakeRun(failures=99), sleep=lambda s: None).gone("5", 0.0) is None


@pytest.mark.parametrize(
    ("reason", "option"),
    [
        ("PartitionConfig", "--slurm-cpus-per-job"),
        ("PartitionTimeLimit", "--slurm-time"),
        ("QOSMaxGRESPerJob", "qos="),
        ("QOSMaxWallDurationPerJobLimit", "--slurm-time"),
        ("AssocMaxCpuPerJobLimit", "account="),
        ("ReqNodeNotAvail, UnavailableNodes:vm", "--slurm-partition"),
        ("Resources", None),
        ("Priority", None),
        ("QOSMaxJobsPerUserLimit", None),  # waits for the user's other jobs to end
        ("AssocGrpCpuLimit", None),
        ("ReqNodeNotAvail, Reserved for maintenance", None),
    ],
)
def test_pending_reasons_that_never_clear_name_the_option(reason, option):
    hint = never_starts(reason)
    assert (hint is None) if option is None else (option in hint)


@pytest.mark.parametrize(
    ("said", "option"),
    [
        ("sbatch: error: Invalid generic resource (gres) specification", "--slurm-gpus-per-job"),
        ("sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: "
         "Invalid partition name specified", "--slurm-partition"),
        ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: "
         "Requested node configuration is not available", "--slurm-mem-gb"),
        ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's "
         "size and/or time limits)", "--slurm-array-parallelism"),
        ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some "
         "limit)", "--slurm-time"),
        ("sbatch: error: Batch job submission failed: Invalid qos specification", "qos="),
    ],
)  # fmt: skip
def test_sbatch_refusals_name_the_option(said, option):
    line = rejection(said)
    assert option in line and "\n" not in line and line.startswith("sbatch refused the job")


def test_squeue_missing_mid_sweep_is_one_line():
    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "squeue")

    with pytest.raises(UserError) as e:
        Queue(strict=True, run=missing, sleep=lambda s: None).snapshot()
    assert "squeue failed 4 times" in str(e.value) and "No such file" in str(e.value)


# -- corrupt claims: stale at once, taken over with one line -------------------------------------------------
CORRUPT = {
    "empty": b"",
    "binary garbage": b"\x00\xff\xfe\x80 garbage",
    "an ISO date as heartbeat": json.dumps(
        {"host": "node-a", "pid": 4321, "started": 0.0, "heartbeat": "2026-12-03T14:00:00+00:00"}
    ).encode(),
    "truncated": b'{"host": "node-a", "pid": 43',
    "not an object": b"[1, 2]",
    "no pid": json.dumps({"host": "node-a", "started": time.time(), "heartbeat": time.time()}).encode(),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_claim_is_stale_at_once_and_taken_over(kind, tmp_path):
    result = tmp_path / "r.json"
    claim_path(result).write_bytes(CORRUPT[kind])
    owner = read_owner(claim_path(result))
    assert "unreadable" in stale_reason(owner)
    claim = try_claim(result, heartbeat=False)
    assert claim is not None and claim.reclaimed_from.startswith("an unknown owner (the claim file is unreadable")
    assert read_owner(claim_path(result))["pid"] == os.getpid()
    claim.release()
    claim_path(result).write_bytes(CORRUPT[kind])
    assert clean_orphans(tmp_path) == [claim_path(result)] and not claim_path(result).exists()


@pytest.mark.parametrize("kind", ["empty", "binary garbage", "an ISO date as heartbeat"])
def test_a_sweep_takes_over_a_corrupt_claim_with_one_line_and_never_waits(kind, synth_root, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    """A corrupt claim appears on a run's result while the sweep runs another: the sweep takes it over, says so in
    one line, and runs it (waiting for it, as for a live owner, would block the sweep until it went stale)."""
    from benchmark.cli import main
    from benchmark.sweep import graph
    from tests.conftest import argv

    results = tmp_path / "r"
    second = results / "runs/linear/svhn/final-s44.json"
    real = graph.execute

    def corrupting(spec, *args, **kwargs):
        if spec.seed == 42:
            claim_path(second).write_bytes(CORRUPT[kind])
        return real(spec, *args, **kwargs)

    poll, sleep = 1234.5, time.sleep

    def no_wait(seconds):
        if seconds == poll:
            raise AssertionError("the sweep waited for a corrupt claim")
        sleep(seconds)

    monkeypatch.setattr(graph, "execute", corrupting)
    monkeypatch.setattr(graph, "CLAIM_POLL_S", poll)
    monkeypatch.setattr(graph.time, "sleep", no_wait)
    capsys.readouterr()
    assert main(argv(f"bench --method linear --tasks svhn --data-root {synth_root} --results {results}",
                     "--epochs", "1", "--seeds", "42,44")) == 0  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(second) in err[0] and "unreadable" in err[0], err
    assert json.loads(second.read_text())["status"] == "ok" and not claim_path(second).exists()


def test_an_owner_that_breaks_the_schema_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="refusing to write an invalid claim: its `heartbeat`"):
        claims.owner_text({"host": "a", "pid": 1, "started": 0.0, "heartbeat": "2026-12-03T14:00:00+00:00"})


@pytest.mark.slow
def test_the_local_driver_takes_over_a_corrupt_claim_with_one_line(synth_root, tmp_path, monkeypatch, capsys):
    """Under `--launcher local`, a corrupt claim on a planned run (here written right after the sweep's start-up
    clean-up) is stale: the driver says so in one line and a worker runs it, instead of waiting for it."""
    from benchmark.cli import main
    from benchmark.sweep import driver
    from tests.conftest import argv

    results = tmp_path / "r"
    second = results / "runs/linear/svhn/final-s44.json"
    real_wave, sleep, slept = driver.WaveSweep.next_wave, time.sleep, []

    def corrupt_first(self, *args, **kwargs):
        if not slept and not claim_path(second).exists() and not second.exists():
            second.parent.mkdir(parents=True, exist_ok=True)
            claim_path(second).write_bytes(b"")
            slept.append(0.0)
        return real_wave(self, *args, **kwargs)

    def bounded(seconds):
        slept.append(seconds)
        if sum(slept) > 60:
            raise AssertionError("the driver waited for a corrupt claim")
        sleep(seconds)

    monkeypatch.setattr(driver.WaveSweep, "next_wave", corrupt_first)
    monkeypatch.setattr(driver, "POLL_S", 0.2)
    monkeypatch.setattr(driver.time, "sleep", bounded)
    capsys.readouterr()
    assert main(argv(f"bench --method linear --tasks svhn --data-root {synth_root} --results {results}",
                     "--epochs", "1", "--seeds", "42,44", "--launcher", "local", "--workers", "1",
                     "--threads", "1")) == 0  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if str(second) in line]
    assert len(err) == 1 and "unknown owner" in err[0] and "unreadable: it is empty" in err[0], err
    assert json.loads(second.read_text())["status"] == "ok" and not claim_path(second).exists()
