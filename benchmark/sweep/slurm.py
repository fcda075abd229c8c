"""SLURM's queue as the sweep sees it: one `squeue` for the whole sweep per poll, shared by every check.

Every liveness question the sweep asks of SLURM (is the job that holds this claim still there, has this
submitted job ended, can this pending job ever start) is answered from one cached snapshot of
`squeue --me`, refreshed at most once per `max_age` seconds, whatever the number of jobs or claims: a
driver of a 1,000-run sweep asks the controller no more often than a driver of one run. A job is judged
by the snapshot only when the snapshot was taken after the job was seen alive (a claim's start, a
submission), with a margin for clocks that differ between hosts, so a job submitted after the last
query is never taken for a job that ended.

submitit watches jobs through `sacct`, which clusters without accounting cannot answer, and asks per
executor; the sweep needs one view shared by the claims and the driver, so this is written here.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from benchmark.core.errors import UserError

# A snapshot older than this is refreshed on the next question (seconds): the SLURM driver's poll interval.
SNAPSHOT_MAX_AGE_S = 15.0
# Attempts at `squeue` before it counts as failed, and the wait before the second (doubled each time).
ATTEMPTS = 4
BACKOFF_S = 2.0
# Clocks of a cluster's hosts may differ by this much (seconds): a snapshot judges a job only when taken
# this long after the moment the job was known to be in the queue.
CLOCK_SKEW_S = 60.0
# States in which the job's processes may still exist. Any other state of a listed job (PENDING, REQUEUED,
# REQUEUE_HOLD, ...) runs nothing: whatever it started before has ended.
ALIVE = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                   "RESIZING"})  # fmt: skip


class QueueUnavailable(UserError):
    """`squeue` kept failing: the controller cannot be asked (nor told to cancel anything)."""


@dataclass(frozen=True)
class QueuedJob:
    state: str
    reason: str


def expand_ids(text: str) -> list[str]:
    """squeue's job ids as single ids: `123`, `123_4`, and a pending array's `123_[5-9,12%4]` as `123_5`, ..."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", text)
    if not m:
        return [text]
    job, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{job}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_squeue(text: str) -> dict[str, QueuedJob]:
    """`squeue -h -o "%i %T %r"` output by single job id (the reason may hold spaces and commas)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        job = QueuedJob(parts[1], parts[2].strip() if len(parts) > 2 else "")
        for job_id in expand_ids(parts[0]):
            jobs[job_id] = job
    return jobs


@dataclass(frozen=True)
class Snapshot:
    jobs: dict[str, QueuedJob]
    taken: float  # wall-clock time when the query was sent

    def gone(self, job_id: str, since: float, margin: float = CLOCK_SKEW_S) -> str | None:
        """Why the processes a job ran at `since` (by a clock that may be `margin` s off ours) have ended: it
        left the queue, or it is back to pending (requeued). None when they may still run, or when this
        snapshot is too old to tell."""
        if self.taken <= since + margin:
            return None
        job = self.jobs.get(job_id)
        if job is None:
            return f"SLURM job {job_id} has left the queue"
        if job.state not in ALIVE:
            return f"SLURM job {job_id} is {job.state.lower()} again (requeued)"
        return None

    def left(self, job_id: str, since: float) -> bool:
        """Whether a job this host submitted at `since` has left the queue (a pending job has not)."""
        return self.taken > since and job_id not in self.jobs


class Queue:
    """The cached view of `squeue --me`. `strict`: a failing or missing squeue is a `UserError` after
    `ATTEMPTS` tries (the slurm launcher's driver, which cannot go on blind); otherwise the queue is unknown
    (None) and callers fall back on heartbeats (workers, and sweeps where SLURM is not used)."""

    def __init__(self, *, max_age: float = SNAPSHOT_MAX_AGE_S, strict: bool = False,
                 run: Callable[..., Any] = subprocess.run, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.max_age, self.strict = max_age, strict
        self._run, self._clock, self._wall, self._sleep = run, clock, wall, sleep
        self._snapshot: Snapshot | None = None
        self._at: float | None = None  # monotonic time of the last query (failed or not)
        self.calls = 0

    def snapshot(self) -> Snapshot | None:
        """The snapshot, refreshed when older than `max_age` (None when SLURM cannot be asked here)."""
        if self._at is not None and self._clock() - self._at < self.max_age:
            return self._snapshot
        self._snapshot = self._query()
        self._at = self._clock()
        return self._snapshot

    def invalidate(self) -> None:
        """Ask again on the next question (after a submission, whose jobs the snapshot cannot hold yet)."""
        self._at = None

    def gone(self, job_id: str, since: float, margin: float = CLOCK_SKEW_S) -> str | None:
        snap = self.snapshot()
        return None if snap is None else snap.gone(job_id, since, margin)

    def left(self, job_id: str, since: float) -> bool:
        snap = self.snapshot()
        return snap is not None and snap.left(job_id, since)

    def _query(self) -> Snapshot | None:
        if not self.strict and shutil.which("squeue") is None:
            return None
        why = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                self._sleep(BACKOFF_S * 2 ** (attempt - 1))
            taken = self._wall()
            self.calls += 1
            try:
                out = self._run(["squeue", "--me", "--noheader", "--array", "--format=%i %T %r"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                why = str(e) or type(e).__name__
                continue
            if out.returncode == 0:
                return Snapshot(parse_squeue(out.stdout), taken)
            why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        if self.strict:
            raise QueueUnavailable(f"squeue failed {ATTEMPTS} times ({why}); check that `squeue --me` answers, then run "
                            "the same command again: finished runs are kept, and the jobs already submitted go on")  # fmt: skip
        return None


_shared = Queue()


def shared_queue() -> Queue:
    """The queue this process's liveness checks share (see `sharing`)."""
    return _shared


@contextlib.contextmanager
def sharing(queue: Queue) -> Iterator[Queue]:
    """Make `queue` the one every liveness check of this process asks, for the block."""
    global _shared
    previous, _shared = _shared, queue
    try:
        yield queue
    finally:
        _shared = previous


def cancel(job_ids: list[str]) -> None:
    """Cancel jobs with as few `scancel` calls as the command line allows (one per 500 ids)."""
    for start in range(0, len(job_ids), 500):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["scancel", *job_ids[start : start + 500]], capture_output=True, timeout=60)


# Pending reasons under which a job never starts unless its request changes, with the option that changes
# it. Limits on what runs at once (`*Grp*`, `*MaxJobs*`, `Priority`, `Resources`) pass by themselves and are
# not listed; nor is a node reserved for maintenance.
_NEVER_STARTS = (
    (r"PartitionConfig|PartitionNodeLimit",
     "the partition cannot give one job this much: lower --slurm-cpus-per-job, --slurm-gpus-per-job or "
     "--slurm-mem-gb, or pick another --slurm-partition"),
    (r"PartitionTimeLimit", "lower --slurm-time to the partition's limit, or pick another --slurm-partition"),
    (r"(QOS|Assoc)MaxWall\w*", "lower --slurm-time to the limit, or use another --slurm-extra qos=..."),
    (r"QOSMax\w*PerJob\w*|QOSMinGRES\w*", "lower --slurm-cpus-per-job, --slurm-gpus-per-job or --slurm-mem-gb "
     "to the QOS's per-job limit, or use another --slurm-extra qos=..."),
    (r"AssocMax\w*PerJob\w*", "lower --slurm-cpus-per-job, --slurm-gpus-per-job or --slurm-mem-gb to the "
     "account's per-job limit, or use another --slurm-extra account=..."),
    (r"ReqNodeNotAvail(?!.*(?i:maint|reserv))",
     "the nodes it needs are down or drained: pick another --slurm-partition, or --slurm-extra exclude=..."),
    (r"BadConstraints", "the node features asked do not exist here: change --slurm-extra constraint=..."),
    (r"InvalidQOS", "the QOS is not open to this account: change --slurm-extra qos=..."),
    (r"InvalidAccount", "the account is not valid: change --slurm-extra account=..."),
)  # fmt: skip


def never_starts(reason: str) -> str | None:
    """What to change when a pending job's `reason` means it can never start (None: it may start later)."""
    return next((hint for pattern, hint in _NEVER_STARTS if re.match(pattern, reason)), None)


# What `sbatch` says when it refuses a job, and the option to change.
_REJECTIONS = (
    (r"gres|generic resource|gpu", "ask no GPU (--slurm-gpus-per-job 0) or pick a partition with GPUs "
     "(--slurm-partition)"),
    (r"submit limit|MaxSubmit",
     "lower --slurm-array-parallelism (the driver keeps no more than that many jobs queued), or use "
     "another --slurm-extra qos=..."),
    (r"partition", "pick an existing partition (`sinfo -s` lists them) with --slurm-partition"),
    (r"time limit", "lower --slurm-time to the partition's limit (`sinfo -o '%P %l'`)"),
    (r"qos", "use a QOS open to this account with --slurm-extra qos=... (`sacctmgr show assoc user=$USER`)"),
    (r"account", "use a valid account with --slurm-extra account=..."),
    (r"array", "lower --slurm-array-parallelism (the driver submits arrays no larger than that)"),
    (r"memory|node configuration|cpu|processor",
     "lower --slurm-cpus-per-job, --slurm-mem-gb or --slurm-gpus-per-job to what one node has "
     "(`sinfo -o '%P %c %m %G'`), or pick another --slurm-partition"),
)  # fmt: skip


def rejection(message: str) -> str:
    """One line for a job `sbatch` refused: what it said, and which option to change."""
    lines = [line.strip() for line in message.splitlines() if "error" in line.lower()] or [message.strip()]
    said = "; ".join(dict.fromkeys(line.removeprefix("sbatch: error: ") for line in lines if line))[-300:]
    hint = next((h for pattern, h in _REJECTIONS if re.search(pattern, said, re.I)), "check the --slurm-* options")
    return f"sbatch refused the job ({said}): {hint}"
