"""submitit's executors for the `local` and `slurm` launchers, and what the driver asks of a submitted job."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LocalJob

from benchmark.core.errors import UserError
from benchmark.sweep.slurm import Queue, never_starts

# A local worker lives as long as the wave it serves; submitit's default would kill it after 2 minutes.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
# How long a stopped local job may take to end (its workers release their claims) before it is killed.
STOP_WAIT_S = 30.0
# The controller process of each local job this process started, by job id (`LocalExecutor`).
CONTROLLERS: dict[str, subprocess.Popen] = {}


class LocalExecutor(submitit.LocalExecutor):
    """submitit's local executor, except that each job's controller runs in a session of its own and writes to
    `controllers.log` in the job folder.

    submitit starts the controller in the driver's process group, writing to the driver's stderr, and has no
    option otherwise: a Ctrl-C at the terminal then reaches every controller too, and each prints its
    `KeyboardInterrupt` traceback there (as does one that `LocalJob.cancel` interrupts). Here a signal reaches
    the driver alone, which stops its jobs as a signal stops a command (`stop_local`). The controller is the one
    submitit starts (`submitit.local._local`), with the environment `submitit.local.local.start_controller` gives it.
    """

    def _submit_command(self, command: str) -> LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        n_gpus = self.parameters.get("gpus_per_node", 0)
        visible = self.parameters.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        env = {
            **os.environ,
            "SUBMITIT_LOCAL_NTASKS": str(ntasks),
            "SUBMITIT_LOCAL_COMMAND": command,
            "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * self.parameters.get("timeout_min", 2.0))),
            "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(self.parameters.get("signal_delay_s", 30))),
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_STDERR_TO_STDOUT": "",
            "SUBMITIT_EXECUTOR": "local",
            "CUDA_VISIBLE_DEVICES": ",".join(str(k) for k in gpus),
            "SUBMITIT_LOCAL_WITH_SHELL": "",
        }
        with open(self.folder / "controllers.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(self.folder)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)  # fmt: skip
        for pid in [pid for pid, p in CONTROLLERS.items() if p.poll() is not None]:
            del CONTROLLERS[pid]  # ended: nothing left to stop
        CONTROLLERS[str(process.pid)] = process
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def stop_local(jobs: list[Any], wait_s: float = STOP_WAIT_S) -> None:
    """Stop local jobs as a signal stops a command: SIGTERM to each controller, which forwards it to its workers;
    each worker raises `Interrupted` (its claim released, its run in flight not recorded) and ends, and so does
    the controller. A job still running after `wait_s` seconds is killed (SIGKILL to its session)."""
    controllers = [p for job in jobs if (p := CONTROLLERS.get(str(job.job_id))) is not None and p.poll() is None]
    for process in controllers:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for process in controllers:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
    logging.getLogger("submitit").setLevel(logging.ERROR)
    folder.mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        executor = LocalExecutor(folder=folder)
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
