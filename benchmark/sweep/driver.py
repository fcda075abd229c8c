"""The driver of the `local` and `slurm` launchers: the protocol as a graph of runs, run wave by wave.

A wave is every run whose inputs exist: at first the grid points (or the final runs, or the dense runs
of a pruning method), then whatever the finished results unlock (the selection, the dense run, the
rewind candidates, the final seeds). The driver walks the sweep's own stages (`sweep.Sweep`), with
`run` answering from the result files and collecting the runs still missing instead of executing them,
submits them as one job array, waits, and walks again. The result files are the only state: a killed
driver is simply started again, and submits only what is missing.

A run is claimed by whoever executes it (`benchmark.sweep.claims`): runs claimed by a live owner elsewhere
(another driver, a user's own `bench`) are waited for, not submitted; a claim whose owner is gone is
taken over, and the driver says so. A run that a job did not finish (the worker died: out of memory, a
node failure, killed) is submitted again once, then recorded `failed` with the cause, and the sweep
goes on.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.core.errors import UserError
from benchmark.run.results import provenance, read_result, write_json
from benchmark.run.runner import new_record, quiet_lightning
from benchmark.sweep.claims import claim_path, claimed, read_owner, stale_reason
from benchmark.sweep.executors import job_failure, job_finished, make_executor, stderr_tail
from benchmark.sweep.graph import Plan, Sweep
from benchmark.sweep.inline import prepare_sweep
from benchmark.sweep.launch import LaunchOptions
from benchmark.sweep.resume import conflict
from benchmark.sweep.worker import RunJob, Worker, WorkerContext, mtime_ns
from methods import MethodConfig
from tasks import Task

# What `run` answers for a run that has no result yet.
PENDING: dict[str, Any] = {"status": "pending"}
# Submissions of a run per driver: the first, and one retry after its worker died.
ATTEMPTS = 2
POLL_S = 1.0
# SLURM's default MaxArraySize is 1001 (indices 0-1000): larger waves go as several arrays.
MAX_ARRAY = 1000


class _Waiting(Exception):
    """A stage needs results that do not exist yet."""


class WaveSweep(Sweep):
    """The sweep's stages, walked without executing: the runs whose inputs exist are collected in `wave`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wave: dict[Path, RunJob] = {}
        self.elsewhere: set[Path] = set()  # claimed by a live owner that is not one of this driver's jobs
        self.seen: set[Path] = set()
        self.retried: set[Path] = set()  # failed results this driver has run again (--retry-failed)
        self.announced: set[str] = set()

    def run(self, plan: Plan, *, deferred: bool = False) -> dict[str, Any]:
        if why := conflict(plan.path, plan.spec, self.data, deferred=deferred):
            raise UserError(f"{why}; use another --results directory or delete the old results")
        self.seen.add(plan.path)
        record = read_result(plan.path)
        if record is not None and not (self.retry_failed and record.get("status") != "ok"
                                       and plan.path not in self.retried):  # fmt: skip
            return record
        owner = read_owner(claim_path(plan.path))
        if owner is not None:
            why = stale_reason(owner)
            if why is None:
                self.elsewhere.add(plan.path)
                return PENDING
            self.note(f"{plan.path}: the claim of {owner.get('host')}:{owner.get('pid')} is stale ({why}); "
                      "it is taken over")  # fmt: skip
        self.wave[plan.path] = RunJob(plan.spec, plan.path, deferred, mtime_ns(plan.path))
        return PENDING

    def settle(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(r is PENDING for r in records):
            raise _Waiting
        return records

    def add_to_plan(self, n: int) -> None:
        pass  # the driver counts the runs it has seen

    def note(self, message: str) -> None:
        if message not in self.announced:
            self.announced.add(message)
            tqdm.write(message, file=sys.stderr)

    def next_wave(self, tasks: list[Task], configs: dict[str, MethodConfig], seeds: list[int]) -> None:
        self.wave, self.elsewhere = {}, set()
        for task in tasks:
            with contextlib.suppress(_Waiting):  # this task's next stage waits for results
                self.task(configs[task.id], task, seeds)


class _Progress:
    """One bar for the whole sweep: runs done / total, running, failed, time left."""

    def __init__(self, state: WaveSweep, known: list[Path], extra: int, name: str, enabled: bool) -> None:
        self.state, self.known, self.extra = state, set(known), extra
        self.status: dict[Path, tuple[int | None, str | None]] = {}
        done, _ = self.count()
        self.bar = tqdm(total=self.total(), initial=done, desc=name, unit="run", disable=not enabled)

    def total(self) -> int:
        return len(self.known | self.state.seen) + self.extra

    def count(self) -> tuple[int, int]:
        """Runs with a result, and those among them that failed (files re-read only when they change)."""
        done = failed = 0
        for path in self.known | self.state.seen:
            mtime = mtime_ns(path)
            if mtime is None:
                continue
            if self.status.get(path, (None, None))[0] != mtime:
                record = read_result(path)
                self.status[path] = (mtime, record.get("status") if record else None)
            done += 1
            failed += self.status[path][1] == "failed"
        return done, failed

    def refresh(self, paths: list[Path]) -> None:
        done, failed = self.count()
        running = sum((o := read_owner(claim_path(p))) is not None and stale_reason(o) is None for p in paths)
        self.bar.total = max(self.total(), done)
        self.bar.set_postfix_str(f"running {running}, failed {failed}", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def record_failure(state: WaveSweep, job: RunJob, cause: str, log: str) -> bool:
    """Record a run whose worker died twice as `failed` with the cause, under its claim (the dead worker's
    is stale by now). False when someone else finished it or holds it meanwhile."""
    with claimed(job.path) as claim:
        if claim is None or mtime_ns(job.path) != job.seen:
            return False
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = new_record(job.spec, state.data)
        record.update(error=f"the worker died, twice: {cause}", traceback=log, wall_time_s=None,
                      started_at=now, finished_at=now, provenance=provenance())  # fmt: skip
        write_json(job.path, record)
    return True


def _dead_runs(jobs: list[Any]) -> dict[str, tuple[str, str]]:
    """Per result path, why the job that was running it died and the tail of its log (read from the
    `peft-bench: run/done` lines the worker prints)."""
    out = {}
    for job in jobs:
        cause = job_failure(job)
        if cause is None:
            continue
        text = job.stderr() or ""
        started = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("peft-bench: run ")]
        finished = {line.split(" ", 3)[2] for line in text.splitlines()
                    if line.startswith(("peft-bench: done ", "peft-bench: skipped "))}  # fmt: skip
        for path in [p for p in started if p not in finished] or ["*"]:
            out[path] = (cause, stderr_tail(job))
    return out


def drive(
    config: MethodConfig,
    tasks: list[Task],
    seeds: list[int],
    *,
    launch: LaunchOptions,
    progress: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`sweep.sweep` through the `local` or `slurm` launcher: same arguments, same results and return value
    (the records of the runs this driver's jobs executed)."""
    kwargs.pop("run_progress", None)  # workers have no terminal
    state, configs, known = prepare_sweep(config, tasks, seeds, sweep_cls=WaveSweep, **kwargs)
    assert isinstance(state, WaveSweep)
    quiet_lightning()
    logs = state.results / "logs" / config.name
    ctx = WorkerContext(state.protocol, state.settings, state.results, Path(kwargs["data_root"]),
                        kwargs.get("cache_dir"), launch.threads)  # fmt: skip
    executor = make_executor(launch.launcher, logs, launch.slurm, f"peft-bench-{config.name}")
    where = f"{launch.workers} local worker(s)" if launch.launcher == "local" else "SLURM job arrays"
    print(f"{config.name}: runs go to {where}; job logs in {logs}", file=sys.stderr, flush=True)
    dense_after_grid = sum(configs[t.id].prunes and state.protocol == "grid" for t in tasks)
    bar = _Progress(state, [p.path for p, _ in known], dense_after_grid, config.name, progress)
    attempts: Counter[Path] = Counter()
    executed: list[dict[str, Any]] = []
    jobs: list[Any] = []
    try:
        while True:
            state.next_wave(tasks, configs, seeds)
            bar.extra = max(0, dense_after_grid - sum(p.name == "dense.json" for p in state.seen))
            wave = [j for j in state.wave.values() if attempts[j.path] < ATTEMPTS]
            if not wave:
                if not state.elsewhere:
                    break
                _wait_elsewhere(state, bar)
                continue
            jobs = _submit(executor, launch, ctx, wave)
            while not all(job_finished(j) for j in jobs):
                bar.refresh([j.path for j in wave])
                time.sleep(POLL_S)
            dead = _dead_runs(jobs)
            for job in wave:
                if mtime_ns(job.path) != job.seen:
                    state.retried.add(job.path)
                    if (record := read_result(job.path)) is not None:
                        executed.append(record)
                    continue
                if (owner := read_owner(claim_path(job.path))) is not None and stale_reason(owner) is None:
                    continue  # another process runs it: waited for in the next wave
                attempts[job.path] += 1
                cause, log = dead.get(str(job.path)) or dead.get("*") or ("its job ended without a result", "")
                if attempts[job.path] < ATTEMPTS:
                    state.note(f"{job.path}: {cause}; submitted again")
                elif record_failure(state, job, cause, log):
                    state.note(f"{job.path}: recorded as failed ({cause})")
                    executed.append(read_result(job.path))
            bar.refresh([])
            jobs = []
    except BaseException:
        for job in jobs:  # interrupted: our jobs stop too (their runs are not recorded, and resume later)
            job.cancel(check=False)
        raise
    finally:
        bar.close()
    return executed


def _submit(executor: Any, launch: LaunchOptions, ctx: WorkerContext, wave: list[RunJob]) -> list[Any]:
    """Local: the launcher's workers, each given the whole wave from its own offset (claims share it out).
    SLURM: one array task per run, in arrays of at most `MAX_ARRAY` tasks."""
    if launch.launcher == "local":
        jobs, n = [], min(launch.workers, len(wave))
        for i in range(n):
            gpu = launch.gpus[i]
            executor.update_parameters(gpus_per_node=0 if gpu is None else 1,
                                       visible_gpus=() if gpu is None else (gpu,))  # fmt: skip
            jobs.append(executor.submit(Worker(), ctx, wave, i * len(wave) // n))
        return jobs
    jobs = []
    for start in range(0, len(wave), MAX_ARRAY):
        chunk = wave[start : start + MAX_ARRAY]
        jobs += executor.map_array(Worker(), [ctx] * len(chunk), [[j] for j in chunk], [0] * len(chunk))
    return jobs


def _wait_elsewhere(state: WaveSweep, bar: _Progress) -> None:
    """Wait until a run claimed by another process has its result, or its claim goes (or goes stale)."""
    watched = {p: mtime_ns(p) for p in state.elsewhere}
    while True:
        bar.refresh(list(watched))
        for path, mtime in watched.items():
            owner = read_owner(claim_path(path))
            if mtime_ns(path) != mtime or owner is None or stale_reason(owner) is not None:
                return
        time.sleep(POLL_S)
