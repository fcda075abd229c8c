"""submitit's executors for the `local` and `slurm` launchers, and what the driver asks of a submitted job."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError
from benchmark.sweep.slurm import Queue, never_starts

# A local worker lives as long as the wave it serves; submitit's default would kill it after 2 minutes.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def check_slurm() -> None:
    """UserError unless `sbatch` exists and the controller answers (nothing is submitted)."""
    if shutil.which("sbatch") is None:
        raise UserError("SLURM is not installed here (no sbatch on PATH); run on the cluster's login node, "
                        "or use --launcher local")  # fmt: skip
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(
            f"the SLURM controller does not answer ({e}); check `sinfo`, or use --launcher local"
        ) from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["sinfo failed"])[-1]
        raise UserError(f"the SLURM controller is not reachable ({why}); check `sinfo`, or use --launcher local")


def make_executor(launcher: str, folder: Path, params: dict[str, Any], name: str):
    """submitit's local or SLURM executor, logging under `folder` (`<job id>_<task>_log.err` and `.out`)."""
    import submitit

    logging.getLogger("submitit").setLevel(logging.ERROR)
    folder.mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(job_name=name, **params)
    return executor


def job_finished(job: Any, queue: Queue, since: float) -> bool:
    """Whether a submitted job has ended, however it ended.

    A local job: its process has ended. A SLURM job submitted at `since`: its result file exists, or the
    shared queue snapshot no longer runs it (submitit would ask sacct, which clusters without accounting
    cannot answer, once per executor).
    """
    if type(job).__name__ != "SlurmJob":
        return job.done()
    if all(task.paths.result_pickle.exists() for task in job_tasks(job)):
        return True
    return queue.left(str(job.job_id), since)


def job_tasks(job: Any) -> list[Any]:
    """A job's tasks, each with its own log and result (node mode runs one task per GPU)."""
    n = getattr(job, "num_tasks", 1)
    return [job] if n <= 1 else [job.task(i) for i in range(n)]


def never_starting(jobs: list[Any], queue: Queue) -> str | None:
    """One line when a pending SLURM job among `jobs` can never start (its pending reason and the option to
    change), else None."""
    snap = queue.snapshot()
    if snap is None:
        return None
    for job in jobs:
        queued = snap.jobs.get(str(job.job_id))
        if queued is not None and queued.state == "PENDING" and (hint := never_starts(queued.reason)):
            return f"SLURM job {job.job_id} can never start (pending: {queued.reason}): {hint}"
    return None


def job_failure(job: Any) -> str | None:
    """Why a finished job failed (its exception, or the last line of its stderr when it died without a
    result), or None when it succeeded."""
    if not job.paths.result_pickle.exists():
        last = stderr_tail(job, 1)
        return f"job {job.job_id} ended without a result" + (f" ({last})" if last else "")
    try:
        job.result()
        return None
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("---")]
        return next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1])


def stderr_tail(job: Any, lines: int = 15) -> str:
    text = job.stderr() or ""
    return "\n".join([line for line in text.strip().splitlines() if line.strip()][-lines:])
