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
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmark.errors import UserError
from tasks.atomic import atomic_write_bytes

SCHEMA_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_path(results: Path, method: str, task: str, protocol: str, seed: int) -> Path:
    return Path(results) / "runs" / method / task / f"{protocol}-s{seed}.json"


def grid_tune_path(results: Path, method: str, task: str, lr: float, weight_decay: float) -> Path:
    return Path(results) / "runs" / method / task / "grid-tune" / f"lr{lr:g}-wd{weight_decay:g}.json"


def write_json(path: Path, obj: Any) -> bool:
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """A result file's content, or None when it is unreadable (e.g. truncated by a crash of another tool)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every reported run (not the grid's tuning runs) under `results/runs`, in path order."""
    runs = Path(results) / "runs"
    out = []
    for path in sorted(runs.glob("*/*/*.json")):
        record = read_json(path)
        if record is not None and record.get("schema") == SCHEMA_VERSION:
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
