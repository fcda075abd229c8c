"""Paths from options and the environment, checked before anything is written: one `UserError` line each.

`how` names where a path came from (`--cache-dir`, `$PEFT_BENCH_CACHE`, `$HOME`, ...) and `fix` what to do,
so the message points at the setting to change rather than at a path the user never typed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from benchmark.core.errors import UserError

MEMINFO = Path("/proc/meminfo")
CACHE_ADVICE = "pass --cache-dir DIR (or set $PEFT_BENCH_CACHE) naming a directory"


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists."""
    path = Path(path).absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_dir(path: Path, what: str, how: str, fix: str, *, writable: bool = True) -> None:
    """Raise `UserError` unless `path` is a directory, or one can be created there, and (`writable`) files can be
    written in it. Creates nothing: the check stops at the nearest existing ancestor.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{what} {path} (from {how}) is not a directory; {fix}")
    probe = nearest_existing(path)
    if not probe.is_dir():
        raise UserError(f"{what} {path} (from {how}) cannot be created: {probe} is not a directory; {fix}")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} (from {how}) cannot be written: {probe} is not writable; {fix}")


def check_files(paths: Iterable[Path], fix: str) -> None:
    """Raise `UserError` unless a file can be written at each of `paths`: none is a directory, and no existing
    ancestor of one is a file. Checked before the first file is written, so a bad path leaves no partial output."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a directory where a file belongs; {fix}")
        probe = nearest_existing(path.parent)
        if not probe.is_dir():
            raise UserError(f"cannot write {path}: {probe} is a file where a directory belongs; {fix}")


def size_text(n: float) -> str:
    """Bytes for a person: `1.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path` (or its nearest ancestor)."""
    st = os.statvfs(nearest_existing(path))
    return st.f_bavail * st.f_frsize


def available_memory() -> int | None:
    """Memory that can be allocated without swapping (`MemAvailable` of /proc/meminfo); None where unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_space(path: Path, needed: int, what: str, fix: str) -> None:
    """Raise `UserError` when the file system of `path` has less than `needed` bytes free (before allocating)."""
    free = free_bytes(path)
    if needed > free:
        raise UserError(f"{what} needs {size_text(needed)} in {path}, and {size_text(free)} is free there; {fix}")


def cache_location(cache_dir: Path | str | None = None) -> tuple[Path, str]:
    """The image cache directory and the setting it came from: `--cache-dir`, else `$PEFT_BENCH_CACHE/arrays`,
    else `$HOME/.cache/peft-bench/arrays`."""
    if cache_dir:
        return Path(cache_dir).expanduser(), "--cache-dir"
    if os.environ.get("PEFT_BENCH_CACHE"):
        return Path(os.environ["PEFT_BENCH_CACHE"]).expanduser() / "arrays", "$PEFT_BENCH_CACHE"
    return Path.home() / ".cache" / "peft-bench" / "arrays", "$HOME"


def check_cache_dir(cache_dir: Path | str | None = None, *, writable: bool = False) -> Path:
    """The image cache directory, or a `UserError` naming the setting to change when it cannot be one.

    A cache that is only read (one built in advance, shared read-only) need not be `writable`. Light on
    imports, so commands check it before the libraries they load complain about the same `$HOME`.
    """
    path, how = cache_location(cache_dir)
    check_dir(path, "image cache directory", how, CACHE_ADVICE, writable=writable)
    return path
