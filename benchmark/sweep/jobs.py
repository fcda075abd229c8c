"""The jobs a driver has in flight: which runs each holds, when it ended, how it died, what may be submitted.

A batch is what one submission shares out: the runs given to a group of local workers (they share them
through claims), or the runs packed into one SLURM array task (`--runs-per-job`; in node mode, shared by
the job's one worker per GPU). A batch's runs are settled (done, failed, or submitted again) once all its
jobs have ended; the driver walks the sweep again as soon as any job ends, so one slow task holds up no
other task's next stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError
from benchmark.sweep.executors import job_failure, job_finished, job_tasks, never_starting, stderr_tail, stop_local
from benchmark.sweep.launch import LaunchOptions
from benchmark.sweep.slurm import Queue, cancel
from benchmark.sweep.worker import RunJob

# SLURM's default MaxArraySize is 1001 (indices 0-1000): larger submissions go as several arrays.
MAX_ARRAY = 1000


def executed_runs(jobs: list[Any]) -> set[str]:
    """The result paths that `jobs` executed themselves (their workers' `peft-bench: done` lines): not those
    they found done, or left to another process that had claimed them first."""
    return {line.split(" ", 3)[2] for task in [t for job in jobs for t in job_tasks(job)]
            for line in (task.stderr() or "").splitlines() if line.startswith("peft-bench: done ")}  # fmt: skip


def dead_runs(jobs: list[Any]) -> dict[str, tuple[str, str]]:
    """Per result path, why the job that was running it died and the tail of its log (read from the
    `peft-bench: run/done` lines the worker prints); `*` for a job that died before naming a run."""
    out = {}
    for task in [t for job in jobs for t in job_tasks(job)]:
        cause = job_failure(task)
        if cause is None:
            continue
        text = task.stderr() or ""
        started = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("peft-bench: run ")]
        finished = {line.split(" ", 3)[2] for line in text.splitlines()
                    if line.startswith(("peft-bench: done ", "peft-bench: skipped "))}  # fmt: skip
        for path in [p for p in started if p not in finished] or ["*"]:
            out[path] = (cause, stderr_tail(task))
    return out


@dataclass
class Batch:
    jobs: list[Any]
    runs: list[RunJob]
    submitted: float  # wall-clock time of the submission
    slots: list[int] = field(default_factory=list)  # local: the worker slot of each job


class InFlight:
    """This driver's batches in flight, and the room left for more (local worker slots, or SLURM jobs under
    `--slurm-array-parallelism` across all arrays together)."""

    def __init__(self, launch: LaunchOptions, queue: Queue) -> None:
        self.launch, self.queue = launch, queue
        self.batches: list[Batch] = []
        self._ended: set[int] = set()  # id() of jobs seen ended
        self._news = False  # a job was seen ended since `news` was last asked

    def paths(self) -> set[Path]:
        return {r.path for b in self.batches for r in b.runs}

    def free_slots(self) -> list[int]:
        busy = {s for b in self.batches for j, s in zip(b.jobs, b.slots, strict=True) if not self.ended(j, b)}
        return [i for i in range(self.launch.workers) if i not in busy]

    def room(self) -> int:
        """How many more runs may be submitted now."""
        if self.launch.launcher == "local":
            return 10**9 if self.free_slots() else 0  # free workers share any number of runs
        limit = self.launch.parallelism
        jobs = sum(len(b.jobs) for b in self.batches)
        return max(0, limit - jobs) * self.launch.runs_per_job if limit else 10**9

    def add(self, jobs: list[Any], runs: list[RunJob], slots: list[int]) -> None:
        now = time.time()
        if self.launch.launcher == "local":
            self.batches.append(Batch(jobs, runs, now, slots[: len(jobs)]))
            return
        k = self.launch.runs_per_job
        self.batches += [Batch([job], runs[i * k : (i + 1) * k], now) for i, job in enumerate(jobs)]
        self.queue.invalidate()  # the next question sees the new jobs

    def ended(self, job: Any, batch: Batch) -> bool:
        if id(job) in self._ended:
            return True
        if job_finished(job, self.queue, batch.submitted):
            self._ended.add(id(job))
            self._news = True
            return True
        return False

    def news(self) -> bool:
        """Whether a job has ended since the last time this was asked (a local worker's slot is free)."""
        for b in self.batches:
            for j in b.jobs:
                self.ended(j, b)
        news, self._news = self._news, False
        return news

    def pop_ended(self) -> list[Batch]:
        """The batches whose every job has ended, removed from flight."""
        done = [b for b in self.batches if all(self.ended(j, b) for j in b.jobs)]
        self.batches = [b for b in self.batches if b not in done]
        return done

    def check_startable(self) -> None:
        """UserError (after cancelling this driver's jobs) when a pending SLURM job can never start."""
        if self.launch.launcher != "slurm" or not self.batches:
            return
        if why := never_starting([j for b in self.batches for j in b.jobs], self.queue):
            self.cancel()
            raise UserError(f"{why}; this sweep's jobs are cancelled")

    def cancel(self) -> None:
        """Stop every job in flight (their runs are not recorded, and resume later); local jobs are waited for,
        so that their claims are released when the driver ends (`executors.stop_local`)."""
        jobs = [j for b in self.batches for j in b.jobs]
        self.batches = []
        if self.launch.launcher == "slurm":
            cancel(sorted({str(j.job_id) for j in jobs}))
            return
        stop_local(jobs)
