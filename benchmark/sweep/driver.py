"""The driver of the `local` and `slurm` launchers: the protocol as a graph of runs, run wave by wave.

A wave is every run whose inputs exist: at first the grid points (or the final runs, or the dense runs
of a pruning method), then whatever the finished results unlock (the selection, the dense run, the
rewind candidates, the final seeds). The driver walks the sweep's own stages (`sweep.Sweep`), with
`run` answering from the result files and collecting the runs still missing instead of executing them,
submits them, and walks again as soon as any of its jobs ends (`benchmark.sweep.jobs`): a task's next
stage never waits for other tasks' runs. The result files are the only state: a killed driver is simply
started again, and submits only what is missing.

On SLURM the driver looks every `SLURM_POLL_S` seconds, and every look asks the controller one `squeue`
for the whole sweep, whatever the number of jobs and claims (`benchmark.sweep.slurm`). A job that
`sbatch` refuses, or one that can never start (its pending reason says the request exceeds what the
partition, QOS or account allows), stops the sweep with one line naming the option to change, after
cancelling the sweep's jobs.

A run is claimed by whoever executes it (`benchmark.sweep.claims`): runs claimed by a live owner elsewhere
(another driver, a user's own `bench`) are waited for, not submitted; a claim whose owner is gone is
taken over, and the driver says so. A run that a job did not finish (the worker died: out of memory, a
node failure, killed) is submitted again once, then recorded `failed` with the cause, and the sweep
goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.core.errors import UserError
from benchmark.run.results import provenance, read_result, write_result
from benchmark.run.runner import new_record, quiet_lightning
from benchmark.sweep.claims import claim_path, claimed, owner_label, read_owner, stale_reason
from benchmark.sweep.decisions import StoredCandidates
from benchmark.sweep.executors import make_executor
from benchmark.sweep.graph import Plan, StageError, Sweep
from benchmark.sweep.inline import prepare_sweep
from benchmark.sweep.jobs import MAX_ARRAY, Batch, InFlight, dead_runs, executed_runs
from benchmark.sweep.launch import LaunchOptions
from benchmark.sweep.slurm import SNAPSHOT_MAX_AGE_S, Queue, QueueUnavailable, cancel, rejection, sharing
from benchmark.sweep.worker import RunJob, Worker, WorkerContext, mtime_ns
from methods import MethodConfig
from tasks import Task

# What `run` answers for a run that has no result yet.
PENDING: dict[str, Any] = {"status": "pending"}
# Submissions of a run per driver: the first, and one retry after its worker died.
ATTEMPTS = 2
# How often the driver looks at its jobs (seconds): local workers are cheap to watch; on SLURM every look
# costs the controller one squeue, so it looks once per snapshot.
POLL_S = 1.0
SLURM_POLL_S = SNAPSHOT_MAX_AGE_S


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
        self.failed_decisions: dict[Path, str] = {}  # decision jobs that died twice, with the cause

    def run(self, plan: Plan, *, deferred: bool = False, outputs: tuple[Path, ...] = ()) -> dict[str, Any]:
        stale = self.check(plan, deferred)
        self.seen.add(plan.path)
        record = read_result(plan.path)
        again = stale or not all(f.is_file() for f in outputs)
        if record is not None and not again and not (self.retry_failed and record.get("status") != "ok"
                                                     and plan.path not in self.retried):  # fmt: skip
            return record
        return self.enqueue(RunJob(plan.spec, plan.path, deferred, mtime_ns(plan.path), outputs=outputs))

    def decide_pruning(self, dense: Plan, path: Path) -> StoredCandidates:
        """A pruning decision is computed by a worker on its device, never here: it goes into the wave."""
        if path in self.failed_decisions:
            raise StageError(f"the pruning decision's job died twice ({self.failed_decisions[path]})")
        self.enqueue(RunJob(dense.spec, path, False, mtime_ns(path), kind="decide"))
        raise _Waiting

    def enqueue(self, job: RunJob) -> dict[str, Any]:
        """Put a job into the wave, unless a live owner elsewhere holds its claim (then it is waited for)."""
        owner = read_owner(claim_path(job.path))
        if owner is not None:
            why = stale_reason(owner)
            if why is None:
                self.elsewhere.add(job.path)
                return PENDING
            self.note(f"{job.path}: the claim of {owner_label(owner)} is stale ({why}); it is taken over")
        self.wave[job.path] = job
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
        write_result(job.path, record)
    return True


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
                        kwargs.get("cache_dir"), launch.threads, state.rerun_stale,
                        interruptible=launch.launcher == "local")  # fmt: skip
    executor = make_executor(launch.launcher, logs, launch.slurm, f"peft-bench-{config.name}")
    where = (f"{launch.workers} local worker(s)" if launch.launcher == "local" else
             f"SLURM job arrays ({launch.runs_per_job} run(s) per job, at most {launch.parallelism} jobs at once, "
             f"the queue asked every {SLURM_POLL_S:.0f} s)")  # fmt: skip
    print(f"{config.name}: runs go to {where}; job logs in {logs}", file=sys.stderr, flush=True)
    dense_after_grid = sum(configs[t.id].trains_dense and state.protocol == "grid" for t in tasks)
    bar = _Progress(state, [p.path for p, _ in known], dense_after_grid, config.name, progress)
    attempts: Counter[Path] = Counter()
    executed: list[dict[str, Any]] = []
    slurm = launch.launcher == "slurm"
    poll = SLURM_POLL_S if slurm else POLL_S
    queue = Queue(strict=slurm)  # every liveness check of this sweep asks this one snapshot
    flight = InFlight(launch, queue)
    try:
        with sharing(queue):
            while True:
                state.next_wave(tasks, configs, seeds)
                bar.extra = max(0, dense_after_grid - sum(p.name == "dense.json" for p in state.seen))
                busy = flight.paths()
                ready = [j for j in state.wave.values() if j.path not in busy and attempts[j.path] < ATTEMPTS]
                if ready and (room := flight.room()):
                    _start(executor, launch, ctx, ready[:room], flight)
                others = state.elsewhere - flight.paths()
                if not flight.batches:
                    if not others:
                        break
                    _wait_elsewhere(others, bar, poll)
                    continue
                for batch in _wait_any(flight, others, bar, poll):
                    _settle(state, batch, attempts, executed)
                bar.refresh([])
    except QueueUnavailable:
        raise  # scancel cannot reach the controller either; the jobs go on, and the same command resumes
    except BaseException:
        flight.cancel()  # interrupted: our jobs stop too (their runs are not recorded, and resume later)
        raise
    finally:
        bar.close()
    return executed


def _settle(state: WaveSweep, batch: Batch, attempts: Counter[Path], executed: list[dict[str, Any]]) -> None:
    """A batch whose jobs have all ended: each of its runs is done (its record joins `executed`), run
    by another process (waited for on the next walk), submitted again, or recorded failed."""
    dead, ran = dead_runs(batch.jobs), executed_runs(batch.jobs)
    for job in batch.runs:
        if mtime_ns(job.path) != job.seen:
            state.retried.add(job.path)
            # Counted only when this batch's jobs executed it: not when another process (an inline sweep,
            # another driver) wrote it meanwhile.
            if job.kind == "run" and str(job.path) in ran and (record := read_result(job.path)) is not None:
                executed.append(record)
            continue
        if (owner := read_owner(claim_path(job.path))) is not None and stale_reason(owner) is None:
            continue  # another process runs it: waited for on the next walk
        attempts[job.path] += 1
        cause, log = dead.get(str(job.path)) or dead.get("*") or ("its job ended without a result", "")
        if attempts[job.path] < ATTEMPTS:
            state.note(f"{job.path}: {cause}; submitted again")
        elif job.kind == "decide":  # no result to record: the task stops at its pruning stage
            state.failed_decisions[job.path] = cause
        elif record_failure(state, job, cause, log):
            state.note(f"{job.path}: recorded as failed ({cause})")
            executed.append(read_result(job.path))


def _start(executor: Any, launch: LaunchOptions, ctx: WorkerContext, ready: list[RunJob], flight: InFlight) -> None:
    """Submit `ready` runs: local, to the free worker slots; SLURM, `runs_per_job` per array task."""
    slots = flight.free_slots() if launch.launcher == "local" else []
    if slots:
        launch = dataclasses.replace(launch, workers=len(slots), gpus=tuple(launch.gpus[i] for i in slots))
    flight.add(_submit(executor, launch, ctx, ready), ready, slots)


def _submit(executor: Any, launch: LaunchOptions, ctx: WorkerContext, wave: list[RunJob]) -> list[Any]:
    """Local: the launcher's workers, each given the whole wave from its own offset (claims share it out).
    SLURM: one array task per `runs_per_job` runs, in arrays of at most `MAX_ARRAY` tasks; a submission
    that `sbatch` refuses is a UserError naming the option to change (this call's jobs cancelled)."""
    if launch.launcher == "local":
        jobs, n = [], min(launch.workers, len(wave))
        for i in range(n):
            gpu = launch.gpus[i]
            executor.update_parameters(gpus_per_node=0 if gpu is None else 1,
                                       visible_gpus=() if gpu is None else (gpu,))  # fmt: skip
            jobs.append(executor.submit(Worker(), ctx, wave, i * len(wave) // n))
        return jobs
    import submitit

    k = launch.runs_per_job
    chunks = [wave[i : i + k] for i in range(0, len(wave), k)]
    jobs = []
    try:
        for start in range(0, len(chunks), MAX_ARRAY):
            part = chunks[start : start + MAX_ARRAY]
            jobs += executor.map_array(Worker(), [ctx] * len(part), part, [0] * len(part))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        cancel([str(j.job_id) for j in jobs])
        raise UserError(rejection(str(e))) from None
    return jobs


def _wait_any(flight: InFlight, others: set[Path], bar: _Progress, poll: float) -> list[Batch]:
    """Wait until one of this driver's jobs ends (a local worker frees its slot) or a run another process
    holds changes; returns the batches whose jobs have all ended. Refused: a job that can never start."""
    watched = {p: mtime_ns(p) for p in others}
    while True:
        flight.check_startable()
        news = flight.news()
        done = flight.pop_ended()
        if news or done or _changed(watched):
            return done
        bar.refresh(sorted(flight.paths()))
        time.sleep(poll)


def _changed(watched: dict[Path, int | None]) -> bool:
    """Whether a run held elsewhere has its result now, or its claim went (or went stale)."""
    for path, mtime in watched.items():
        owner = read_owner(claim_path(path))
        if mtime_ns(path) != mtime or owner is None or stale_reason(owner) is not None:
            return True
    return False


def _wait_elsewhere(paths: set[Path], bar: _Progress, poll: float) -> None:
    """Wait until a run claimed by another process has its result, or its claim goes (or goes stale)."""
    watched = {p: mtime_ns(p) for p in paths}
    while not _changed(watched):
        bar.refresh(list(watched))
        time.sleep(poll)
