"""`--launcher inline|local|slurm` and its options, shared by `bench` and `reproduce`, checked before
anything is written or submitted."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from benchmark.core.errors import UserError
from benchmark.core.platform import usable_cpus

LAUNCHERS = ("inline", "local", "slurm")
# The slurm options as (flag, attribute): any of them without `--launcher slurm` is an error.
SLURM_FLAGS = {
    "--slurm-partition": "slurm_partition",
    "--slurm-time": "slurm_time",
    "--slurm-gpus-per-job": "slurm_gpus",
    "--slurm-cpus-per-job": "slurm_cpus",
    "--slurm-mem-gb": "slurm_mem_gb",
    "--slurm-array-parallelism": "slurm_array_parallelism",
    "--slurm-extra": "slurm_extra",
    "--runs-per-job": "runs_per_job",
}
# A SLURM job's time limit per run that each of its workers holds, unless --slurm-time says otherwise (minutes).
MINUTES_PER_RUN = 240
# Jobs of this driver in the queue at once, all arrays together, unless --slurm-array-parallelism says.
PARALLELISM = 256


@dataclass(frozen=True)
class LaunchOptions:
    """Where the runs go and how many at once.

    Attributes:
        launcher: `inline`, `local` or `slurm`.
        workers: local worker processes.
        gpus: the GPU each local worker is pinned to (`CUDA_VISIBLE_DEVICES`), or None on a CPU.
        threads: torch threads per worker (inline: of this process; 0 leaves torch's default).
        slurm: submitit's SLURM parameters (partition, time limit, GPUs, CPUs, memory, array parallelism,
            additional directives).
        runs_per_job: runs packed into one SLURM job (start-up, weights and data paid once per job).
        parallelism: SLURM jobs of this driver queued or running at once, all arrays together.
    """

    launcher: str = "inline"
    workers: int = 1
    gpus: tuple[int | None, ...] = (None,)
    threads: int = 1
    slurm: dict = field(default_factory=dict)
    runs_per_job: int = 1
    parallelism: int = PARALLELISM


def _minutes(text: str) -> int:
    """`90`, `1:30:00` or `2-00:00:00` (SLURM's forms) as whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UserError(f"--slurm-time takes minutes, H:MM:SS or D-HH:MM:SS, got {text!r}")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(3) is None and not days:
        return max(1, a)  # plain minutes
    hours, minutes, seconds = (a, b, c) if m.group(4) is not None else (a, b, 0)
    return max(1, days * 1440 + hours * 60 + minutes + (seconds > 0))


def _slurm_extra(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--slurm-extra takes KEY=VALUE (an #SBATCH directive), got {item!r}")
        out[key.replace("-", "_")] = value.strip()
    return out


def visible_gpus() -> list[int]:
    """The GPUs this process may use, by the ids `CUDA_VISIBLE_DEVICES` takes."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if all(x.strip().isdigit() for x in env) and len(env) == torch.cuda.device_count():
        return [int(x) for x in env]
    return list(range(torch.cuda.device_count()))


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The command line's launcher options, checked: UserError for any that cannot be honoured."""
    launcher = getattr(args, "launcher", "inline")
    given = [flag for flag, attr in SLURM_FLAGS.items() if getattr(args, attr, None) is not None]
    if launcher != "slurm" and given:
        raise UserError(f"{given[0]} needs --launcher slurm (it is {launcher})")
    local_given = [f for f, a in (("--workers", "workers"), ("--runs-per-gpu", "runs_per_gpu"))
                   if getattr(args, a, None) is not None]  # fmt: skip
    if launcher != "local" and local_given:
        raise UserError(f"{local_given[0]} needs --launcher local (it is {launcher})")
    cpus = usable_cpus()
    if launcher == "inline":
        return LaunchOptions(threads=args.threads or 0)
    if launcher == "local":
        gpus = visible_gpus()
        per_gpu = args.runs_per_gpu or 1
        if per_gpu > 1 and not gpus:
            raise UserError(f"--runs-per-gpu {per_gpu} packs runs on a GPU, and none is visible; use --workers")
        workers = args.workers or (len(gpus) * per_gpu if gpus else 1)
        if gpus and workers > len(gpus) * per_gpu:
            raise UserError(f"--workers {workers} exceeds {len(gpus)} GPU(s) × --runs-per-gpu {per_gpu}; "
                            "raise --runs-per-gpu or lower --workers")  # fmt: skip
        pinned = tuple(gpus[i // per_gpu] for i in range(workers)) if gpus else (None,) * workers
        return LaunchOptions("local", workers, pinned, args.threads or max(1, cpus // workers))
    from benchmark.sweep.executors import check_slurm

    check_slurm()
    gpus = 1 if args.slurm_gpus is None else args.slurm_gpus
    if gpus < 0:
        raise UserError(f"--slurm-gpus-per-job must be 0 or more, got {gpus}")
    workers = max(1, gpus)  # node mode: one worker per GPU, sharing the job's runs
    per_job = args.runs_per_job or workers
    if per_job < workers:
        raise UserError(f"--runs-per-job {per_job} leaves GPUs of a {gpus}-GPU job idle (one worker per GPU); "
                        f"use --runs-per-job {gpus} or more")  # fmt: skip
    job_cpus = args.slurm_cpus or 8 * workers
    if job_cpus < workers:
        raise UserError(f"--slurm-cpus-per-job {job_cpus} is fewer than one per GPU ({gpus}); raise it")
    parallelism = args.slurm_array_parallelism or PARALLELISM
    params = {
        "time": _minutes(args.slurm_time) if args.slurm_time else MINUTES_PER_RUN * -(-per_job // workers),
        "cpus_per_task": job_cpus // workers,
        "partition": args.slurm_partition,
        "mem": f"{args.slurm_mem_gb}GB" if args.slurm_mem_gb else None,
        "array_parallelism": parallelism,
        "additional_parameters": _slurm_extra(args.slurm_extra or []),
    }
    if gpus == 1:
        params["gpus_per_node"] = 1
    elif gpus > 1:  # SLURM binds one GPU to each task (CUDA_VISIBLE_DEVICES)
        params.update(ntasks_per_node=gpus, gpus_per_task=1)
    params = {k: v for k, v in params.items() if v not in (None, {})}
    return LaunchOptions("slurm", 1, (None,), args.threads or job_cpus // workers, params, per_job, parallelism)
