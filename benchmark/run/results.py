"""Result files: one JSON per run, written atomically, with the provenance to reproduce it.

Layout of a results directory:

    <results>/runs/<method>/<task>/<protocol>-s<seed>.json        reported runs (final, tune, grid)
    <results>/runs/<method>/<task>/grid-tune/lr<lr>-wd<wd>.json   the grid protocol's tuning runs
    <results>/leaderboard.md, leaderboard.csv, leaderboard.html, accuracy_vs_params.png
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from benchmark.core.errors import UserError
from benchmark.core.paths import check_files
from benchmark.run.schema import RESULT
from benchmark.run.schema import SCHEMA_VERSION as SCHEMA_VERSION  # the runner writes it
from benchmark.run.schema import problem as schema_problem
from tasks import SUITES
from tasks.atomic import atomic_write_bytes

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_path(results: Path, method: str, task: str, protocol: str, seed: int) -> Path:
    return Path(results) / "runs" / method / task / f"{protocol}-s{seed}.json"


def grid_tune_path(results: Path, method: str, task: str, lr: float, weight_decay: float) -> Path:
    return Path(results) / "runs" / method / task / "grid-tune" / f"lr{lr:g}-wd{weight_decay:g}.json"


class ResultFileError(UserError):
    """A result file that cannot be trusted: unreadable, truncated, or not of the result schema."""


def json_text(obj: Any) -> str:
    """`obj` as `write_json` writes it (NaN allowed: a diverged run records its non-finite losses)."""
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n"


def write_json(path: Path, obj: Any) -> bool:
    return atomic_write_bytes(path, json_text(obj).encode())


def result_problem(text: str | bytes, path: Path) -> str | None:
    """What makes `text` an invalid result file at `path` (None when it is valid): the result schema
    (`benchmark.run.schema`), and a file under `runs/<method>/<task>/` must be a result of that method and task."""
    if not text.strip():
        return "it is empty"
    try:
        record = RESULT.validate_json(text)
    except ValidationError as e:
        return schema_problem(e)
    parts = Path(path).parts
    if "runs" in parts:
        i = len(parts) - 1 - parts[::-1].index("runs")
        if len(parts) > i + 2 and (record.method, record.task) != (parts[i + 1], parts[i + 2]):
            return f"it is a result of {record.method}/{record.task}, filed under {parts[i + 1]}/{parts[i + 2]}"
    return None


def invalid(path: Path, problem: str) -> ResultFileError:
    return ResultFileError(
        f"{path} is not a valid result file: {problem}; delete it (the same command then runs it again) or "
        "move it out of the results directory"
    )


def validate_result(record: Any, path: Path) -> dict[str, Any]:
    """`record` when it is a valid result for `path` (checked as the JSON text `write_json` makes of it), else
    `ResultFileError` (one line: which file, why, and what to do)."""
    if (problem := result_problem(json_text(record), path)) is not None:
        raise invalid(path, problem)
    return record


def write_result(path: Path, record: dict[str, Any]) -> bool:
    """Write a result record atomically, after validating the very text written: a record that violates the
    schema is a bug of its writer, raised as `ValueError` before anything is written."""
    text = json_text(record)
    if (problem := result_problem(text, path)) is not None:
        raise ValueError(f"refusing to write an invalid result to {path}: {problem}")
    return atomic_write_bytes(path, text.encode())


def read_result(path: Path) -> dict[str, Any] | None:
    """The validated result at `path`; None when there is none. Anything else there is a `ResultFileError`.

    The dict returned is `json.loads`'s of the file (keys and values as stored, so hashes of it do not depend on
    the schema's models)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ResultFileError(
            f"{path} is a directory where a result file belongs; move it out of the results directory"
        ) from None
    except OSError as e:
        raise ResultFileError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    if (problem := result_problem(text, path)) is not None:
        raise invalid(path, problem)
    return json.loads(text)


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every reported run (not the grid's tuning runs) under `results/runs`, in path order, validated."""
    runs = Path(results) / "runs"
    out = []
    for path in sorted(runs.glob("*/*/*.json")):
        record = read_result(path)
        if record is not None:
            out.append(record)
    return out


def check_writable(path: Path, *, option: str = "--results", what: str = "results directory") -> None:
    """Raise `UserError` unless files can be created in the directory `path` (the check leaves nothing behind).

    `option` and `what` name the command-line option and the directory in the message.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; pass a directory to {option}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {what} {path}: {probe} is not a directory; pick another {option}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".peft-bench-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to {what} {path} ({e.strerror or e}); pick another {option}") from None


# Each suite's leaderboard CSV and PNG plot in a results directory (VTAB-1k's names are the ones it always had).
SUITE_FILES: dict[str, tuple[str, str]] = {
    s: ("leaderboard.csv", "accuracy_vs_params.png") if s == "vtab1k"
    else (f"leaderboard-{s}.csv", f"accuracy_vs_params-{s}.png")
    for s in SUITES
}  # fmt: skip
# What `leaderboard` writes into a results directory (checked before a sweep trains anything).
REPORT_FILES = ("leaderboard.md", "leaderboard.html", *(name for files in SUITE_FILES.values() for name in files))
# What to do about an output path in a results directory that cannot be written.
OUTPUT_FIX = "move it away or pick another --results"


def check_outputs(results: Path, names: Iterable[str]) -> None:
    """Raise `UserError` unless each of `names` can be written as a file in `results`: checked before the first
    one is written, so a bad path leaves no partial output."""
    check_files([Path(results) / name for name in names], OUTPUT_FIX)


def check_result_path(path: Path, results: Path) -> None:
    """Raise `UserError` unless a result file can be written at `path` and the reports in `results`: no directory
    where a file belongs and no file where a directory belongs. Checked before any training."""
    path, results = Path(path), Path(results)
    for target in (path, *(results / name for name in REPORT_FILES)):
        if target.is_dir():
            raise UserError(f"{target} is a directory where a file belongs; {OUTPUT_FIX}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent} is a file where a directory belongs; {OUTPUT_FIX}")
        if parent == results:
            break


@functools.cache
def provenance() -> dict[str, Any]:
    """Git commit (and whether the tree had uncommitted changes), package versions, device."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {"python": platform.python_version()}
    for package in ("peft-bench", "torch", "timm", "pytorch-lightning", "torchmetrics", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "device": device_name(),
        "platform": platform.platform(),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
