"""What a submitted job does: run its share of a wave through the sweep's own claim-protected path.

A job gets the whole wave (local workers) or one run (a SLURM array task). It goes through the runs from
its own offset, skips those already done or claimed by a live owner, and runs the others with
`Sweep.run`, which claims each run before it starts; so local workers share a wave without a queue, and
a run is never executed twice, whoever else (another driver, a user's own `bench`) works on the same
results directory. Each job is one process on one device; it prints `peft-bench: run <path>` before a
run and `peft-bench: done <path> <status>` after (`skipped` when another process claimed the run first
and the job waited for its result), which the driver reads back from the job's log to name the run a
dead job was on.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from benchmark.core.errors import Interrupted
from benchmark.core.signals import interruptible
from benchmark.run.runner import RunSpec, Settings


@dataclass
class RunJob:
    """One run of a wave: its spec, its result path, whether its config was deferred (see `resume.identity`),
    and the result file's modification time when the driver planned it (None: absent; a failed result
    the driver wants run again otherwise)."""

    spec: RunSpec
    path: Path
    deferred: bool
    seen: int | None = None
    # `run`, or `decide`: the pruning decision at `path` from the dense run of `spec` (on the worker's device).
    kind: str = "run"
    # Files the run writes beside its result: missing, the run is done again (a dense run's saved states).
    outputs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class WorkerContext:
    """What every job of a sweep shares."""

    protocol: str
    settings: Settings
    results: Path
    data_root: Path
    cache_dir: Path | None
    threads: int
    rerun_stale: bool = False
    # Local workers: SIGTERM (the driver stopping its jobs) raises `Interrupted`, as in any command, so the run in
    # flight releases its claim and is not recorded. (submitit's jobs otherwise ignore SIGTERM.)
    interruptible: bool = False


def mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def task_offset(n: int) -> int:
    """Where this task starts in its job's `n` runs: in node mode each of a job's tasks (one per GPU) starts
    at its own share, so the job's workers do not all wait on the first run's claim."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return 0
    return env.global_rank * n // max(1, env.num_tasks)


class Worker(submitit.helpers.Checkpointable):
    """The submitted callable. On preemption or a time limit submitit requeues it with the same arguments
    (`Checkpointable`): the result files hold all the state, so the requeued job skips what is done."""

    def __call__(self, ctx: WorkerContext, jobs: list[RunJob], offset: int = 0) -> list[dict[str, Any]]:
        if not ctx.interruptible:
            return self.work(ctx, jobs, offset)
        try:
            with interruptible():
                return self.work(ctx, jobs, offset)
        except Interrupted as e:
            print(f"peft-bench: stopped by {signal.Signals(e.signum).name}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None

    def work(self, ctx: WorkerContext, jobs: list[RunJob], offset: int) -> list[dict[str, Any]]:
        """Run this job's share of `jobs` (see the module's docstring)."""
        import torch
        from tqdm.auto import tqdm

        from benchmark.run.resolve import Backbones
        from benchmark.run.runner import SweepData, prepare_data, quiet_lightning
        from benchmark.run.splits import mode_splits
        from benchmark.sweep.claims import claim_path, read_owner, stale_reason
        from benchmark.sweep.graph import Plan, Sweep

        torch.set_num_threads(ctx.threads)
        quiet_lightning()
        data = SweepData({}, {})
        state = None
        out = []
        offset = (offset + task_offset(len(jobs))) % max(1, len(jobs))
        for job in jobs[offset:] + jobs[:offset]:
            if mtime_ns(job.path) != job.seen:
                continue  # done (or redone) by someone else since the driver planned it
            owner = read_owner(claim_path(job.path))
            if owner is not None and stale_reason(owner) is None:
                continue  # a live owner runs it; the driver waits for it
            task = job.spec.task
            if task.id not in data.tasks:
                loaded = prepare_data(ctx.data_root, [task], job.spec.mode, ctx.settings, ctx.cache_dir)
                data.tasks.update(loaded.tasks)
                data.arrays.setdefault(task.id, {}).update(loaded.arrays[task.id])
            elif not set(mode_splits(task, job.spec.mode)) <= set(data.arrays[task.id]):
                loaded = prepare_data(ctx.data_root, [task], job.spec.mode, ctx.settings, ctx.cache_dir)
                data.arrays[task.id].update(loaded.arrays[task.id])
            if state is None:
                # Each run's backbone from its own config (`Sweep.run`), one per distinct arguments.
                state = Sweep(job.spec.config, protocol=ctx.protocol, settings=ctx.settings, results=ctx.results,
                              backbones=Backbones(ctx.settings), data=data, retry_failed=False, run_progress=False,
                              rerun_stale=ctx.rerun_stale)  # fmt: skip
                state.bar = tqdm(disable=True)
            state.retry_failed = job.seen is not None
            print(f"peft-bench: run {job.path}", file=sys.stderr, flush=True)
            if job.kind == "decide":
                dense = state.dense_plan(job.spec.config, task, job.spec.selection, job.spec.decisions)
                state.decide_pruning(dense, job.path)
                print(f"peft-bench: done {job.path} ok", file=sys.stderr, flush=True)
                out.append({"path": str(job.path), "status": "ok", "error": None})
                continue
            executed = len(state.executed)
            record = state.run(Plan(job.spec, job.path), deferred=job.deferred, outputs=job.outputs)
            if len(state.executed) > executed:
                print(f"peft-bench: done {job.path} {record['status']}", file=sys.stderr, flush=True)
            else:  # claimed by another process between our look and our claim: we waited for its result
                print(f"peft-bench: skipped {job.path} (run by another process)", file=sys.stderr, flush=True)
            out.append({"path": str(job.path), "status": record["status"], "error": record.get("error")})
        return out
