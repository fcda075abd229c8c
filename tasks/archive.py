"""The community VTAB-1k archive: find the task folders in a zip, tar or folder, stage, validate, install.

Pure data handling: no downloads, no command line. Problems with a task are collected as one-line
messages in its `TaskReport`; problems with the source as a whole raise `DataError`.

Install protocol, so that an interrupted run never leaves a task that later passes as valid:

1. the task's folder is extracted (or hard-linked/copied) into `<out>/.peft-bench-staging-<task>-<random>`;
2. it is validated there: the four split files, their line counts (800 / 200 / 1,000 / the task's test
   size), labels in [0, C), every listed image present and decodable;
3. a valid folder is renamed to `<out>/<task id>` (older folders of the same task, under any alias, are
   moved aside first and deleted after);
4. the marker `<out>/<task id>/.peft-bench-valid.json`, holding the sha256 of each split file, is written last.

A later run skips a task whose marker matches its split files; a task folder without a matching marker
is validated in place (and renamed to its canonical id) before anything is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.atomic import atomic_write_bytes
from tasks.folder import DataError, decode_image, read_split
from tasks.vtab import SPLITS, Task, UnknownTaskError, get_task

STAGING_PREFIX = ".peft-bench-staging-"
OLD_PREFIX = ".peft-bench-old-"
MARKER = ".peft-bench-valid.json"
MARKER_VERSION = 1
MAX_IMAGE_PROBLEMS = 10
# How deep below the source's top the folder holding the task folders may be (`vtab-1k/` is depth 1).
MAX_ROOT_DEPTH = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def _task_of(name: str) -> Task | None:
    """The task a folder name stands for (canonical id or alias, case-insensitive), if any."""
    if not name or name.startswith(".") or name.startswith("__"):
        return None
    try:
        return get_task(name)
    except UnknownTaskError:
        return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _count_lines(raw: bytes) -> int:
    return sum(1 for line in raw.decode("utf-8-sig", errors="replace").splitlines() if line.strip())


# -- reports -----------------------------------------------------------------------------------------------
INSTALLED, UP_TO_DATE, IN_PLACE, FAILED, MISSING = "installed", "up to date", "validated in place", "FAILED", "missing"


@dataclass
class TaskReport:
    """What became of one task: its status, line count per split (None: file missing) and its problems."""

    task: Task
    status: str = FAILED
    lines: dict[str, int | None] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in (INSTALLED, UP_TO_DATE, IN_PLACE)


# -- validation --------------------------------------------------------------------------------------------
def _image_problem(path: Path) -> str | None:
    try:
        decode_image(path, 8)
    except DataError as e:
        return str(e)
    except Exception as e:  # e.g. PIL's DecompressionBombError: still one line about one file
        return f"cannot read image {path}: {type(e).__name__}: {e}"
    return None


def validate_task_dir(task_dir: Path, task: Task, *, display: str | None = None, workers: int = 0) -> TaskReport:
    """Check a task folder: every split file present, its line count, its lines and labels, every image decodes.

    Messages name files as `display` instead of `task_dir` (the staging folder is gone by the time the
    user reads them). The report's status is FAILED when there is any problem, else INSTALLED.
    """
    task_dir = Path(task_dir)
    shown = display or str(task_dir)

    def rewrite(message: str) -> str:
        return message.replace(str(task_dir), shown)

    report = TaskReport(task)
    images: dict[Path, None] = {}
    for split in SPLITS:
        path = task_dir / f"{split}.txt"
        if not path.is_file():
            report.lines[split] = None
            needed = ", ".join(f"{s}.txt" for s in SPLITS)
            report.problems.append(f"{shown}/{split}.txt is missing (task {task.id} needs {needed})")
            continue
        raw = path.read_bytes()
        report.sha256[split] = hashlib.sha256(raw).hexdigest()
        found = report.lines[split] = _count_lines(raw)
        expected = task.split_sizes[split]
        if found != expected:
            report.problems.append(f"{shown}/{split}.txt: expected {expected} lines, found {found}")
        try:
            split_file = read_split(task_dir, task, split, check_files=True)
        except DataError as e:
            report.problems.append(rewrite(str(e)))
            continue
        images.update(dict.fromkeys(split_file.images))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        bad = [p for p in pool.map(_image_problem, images, chunksize=64) if p is not None]
    report.problems.extend(rewrite(p) for p in bad[:MAX_IMAGE_PROBLEMS])
    if len(bad) > MAX_IMAGE_PROBLEMS:
        report.problems.append(f"{len(bad) - MAX_IMAGE_PROBLEMS} more unreadable images in {shown}")
    report.status = FAILED if report.problems else INSTALLED
    return report


# -- the marker --------------------------------------------------------------------------------------------
def write_marker(task_dir: Path, report: TaskReport, source: dict[str, str]) -> None:
    payload = {
        "version": MARKER_VERSION,
        "task": report.task.id,
        "checked": "split files present, line counts, labels, every image decoded",
        "source": source,
        "splits": {s: {"sha256": report.sha256[s], "lines": report.lines[s]} for s in SPLITS},
    }
    atomic_write_bytes(Path(task_dir) / MARKER, (json.dumps(payload, indent=1) + "\n").encode())


def installed_report(out: Path, task: Task) -> TaskReport | None:
    """The report of `<out>/<task id>` when its marker matches its split files, else None."""
    dest = Path(out) / task.id
    try:
        marker = json.loads((dest / MARKER).read_text())
        if marker.get("version") != MARKER_VERSION or marker.get("task") != task.id:
            return None
        splits = marker["splits"]
        for split in SPLITS:
            path = dest / f"{split}.txt"
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != splits[split]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(task_folders(out, task)) != 1:
        return None
    return TaskReport(
        task,
        UP_TO_DATE,
        lines={s: splits[s]["lines"] for s in SPLITS},
        sha256={s: splits[s]["sha256"] for s in SPLITS},
        path=dest,
    )


# -- installing --------------------------------------------------------------------------------------------
def task_folders(out: Path, task: Task) -> list[Path]:
    """The folders of `task` directly under `out`, under its id or any alias."""
    out = Path(out)
    if not out.is_dir():
        return []
    wanted = {n.lower() for n in task.names}
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name.lower() in wanted)


def clean_leftovers(out: Path) -> None:
    """Remove staging and moved-aside folders an interrupted run left under `out`."""
    out = Path(out)
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith((STAGING_PREFIX, OLD_PREFIX)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def staging_dir(out: Path, task: Task) -> Path:
    return Path(out) / f"{STAGING_PREFIX}{task.id}-{secrets.token_hex(4)}"


def install(folder: Path, out: Path, report: TaskReport, source: dict[str, str]) -> Path:
    """Put a validated folder in place as `<out>/<task id>`, replacing the task's other folders; marker last."""
    out, task = Path(out), report.task
    dest = out / task.id
    folder = Path(folder)
    aside = []
    for old in task_folders(out, task):
        if old.resolve() == folder.resolve():
            continue
        moved = out / f"{OLD_PREFIX}{old.name}-{secrets.token_hex(4)}"
        old.rename(moved)
        aside.append(moved)
    if folder.resolve() != dest.resolve() or folder.name != dest.name:
        folder.rename(dest)
    write_marker(dest, report, source)
    for moved in aside:
        shutil.rmtree(moved, ignore_errors=True)
    report.path = dest
    return dest


# -- sources -----------------------------------------------------------------------------------------------
def _choose_root(candidates: dict[str, dict[str, set[str]]], tasks: Iterable[Task]) -> tuple[str, dict[str, str]]:
    """Pick the folder holding the task folders: the most tasks, then the shallowest; map task id -> folder."""
    if not candidates:
        return "", {}
    root = max(candidates, key=lambda r: (len(candidates[r]), -len(PurePosixPath(r).parts)))
    found: dict[str, str] = {}
    for task in tasks:
        names = sorted(candidates[root].get(task.id, ()))
        if len(names) > 1:
            where = root or "the top level"
            raise DataError(f"task {task.id} has several folders in {where} ({', '.join(names)}); keep one")
        if names:
            found[task.id] = str(PurePosixPath(root, names[0])) if root else names[0]
    return root, found


def _safe_relative(rel: str) -> PurePosixPath | None:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or path.name == MARKER:
        return None
    return path


class Source:
    """Where the task folders come from: a folder, a zip or a tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def provenance(self) -> dict[str, str]:
        """What the marker records about the source: its path (and, for an archive, its sha256)."""
        return {"path": str(self.path)}

    def locate(self, tasks: Iterable[Task]) -> dict[str, str]:
        """Task id -> the task's folder, relative to the source (posix); tasks not found are left out."""
        raise NotImplementedError

    def display(self, folder: str) -> str:
        """How messages name the task folder `folder` of this source."""
        raise NotImplementedError

    def stage(self, folders: dict[str, str], out: Path, log: Log = _quiet) -> Iterator[tuple[str, Path]]:
        """Copy each task folder into its own staging folder under `out`; yields (task id, staging folder).

        A staging folder not yet yielded is removed when the generator is closed or fails.
        """
        raise NotImplementedError


class FolderSource(Source):
    """An unpacked copy; files are hard-linked into the staging folders when possible, else copied."""

    def locate(self, tasks: Iterable[Task]) -> dict[str, str]:
        candidates: dict[str, dict[str, set[str]]] = {}

        def walk(folder: Path, rel: PurePosixPath, depth: int) -> None:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for child in children:
                task = _task_of(child.name)
                if task is not None:
                    candidates.setdefault(str(rel) if rel.parts else "", {}).setdefault(task.id, set()).add(child.name)
                elif depth < MAX_ROOT_DEPTH:
                    walk(child, rel / child.name, depth + 1)

        walk(self.path, PurePosixPath(), 0)
        return _choose_root(candidates, tasks)[1]

    def display(self, folder: str) -> str:
        return str(self.path / folder)

    def stage(self, folders: dict[str, str], out: Path, log: Log = _quiet) -> Iterator[tuple[str, Path]]:
        for task_id, folder in folders.items():
            task = get_task(task_id)
            dest = staging_dir(out, task)
            log(f"{task_id}: copying {self.path / folder}")
            try:
                shutil.copytree(
                    self.path / folder, dest, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MARKER)
                )
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            yield task_id, dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _ArchiveSource(Source):
    _sha256: str | None = None

    def provenance(self) -> dict[str, str]:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return {"path": str(self.path), "sha256": self._sha256}

    def names(self) -> list[str]:
        raise NotImplementedError

    def locate(self, tasks: Iterable[Task]) -> dict[str, str]:
        dirs: set[PurePosixPath] = set()
        for name in self.names():
            path = PurePosixPath(name)
            dirs.add(path if name.endswith("/") else path.parent)
        candidates: dict[str, dict[str, set[str]]] = {}
        for d in dirs:
            for i, part in enumerate(d.parts[: MAX_ROOT_DEPTH + 1]):
                task = _task_of(part)
                if task is not None:
                    root = str(PurePosixPath(*d.parts[:i])) if i else ""
                    candidates.setdefault(root, {}).setdefault(task.id, set()).add(part)
                    break
                if part.startswith((".", "__")):
                    break
        return _choose_root(candidates, tasks)[1]

    def display(self, folder: str) -> str:
        return f"{self.path}!/{folder}"

    def _targets(self, folders: dict[str, str]) -> dict[str, str]:
        """Member prefix (`<root>/<task folder>/`) -> task id."""
        return {f"{folder}/": task_id for task_id, folder in folders.items()}


class ZipSource(_ArchiveSource):
    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(
                f"{self.path} is not a readable zip archive ({e}); download it again or pass an unpacked folder"
            ) from None

    def names(self) -> list[str]:
        with self._open() as zf:
            return zf.namelist()

    def stage(self, folders: dict[str, str], out: Path, log: Log = _quiet) -> Iterator[tuple[str, Path]]:
        targets = self._targets(folders)
        with self._open() as zf:
            members: dict[str, list[tuple[zipfile.ZipInfo, PurePosixPath]]] = {t: [] for t in folders}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                for target, task_id in targets.items():
                    if info.filename.startswith(target):
                        rel = _safe_relative(info.filename[len(target) :])
                        if rel is not None:
                            members[task_id].append((info, rel))
                        break
            for task_id, items in members.items():
                dest = staging_dir(out, get_task(task_id))
                log(f"{task_id}: extracting {len(items)} files from {self.path.name}")
                try:
                    dest.mkdir(parents=True)
                    for info, rel in items:
                        target = dest.joinpath(*rel.parts)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise DataError(f"{self.path} is damaged ({e}); download it again") from None
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
                yield task_id, dest


class TarSource(_ArchiveSource):
    """A tar archive (optionally compressed), read in two streaming passes: names, then contents."""

    def _open(self, mode: str) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, mode)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"{self.path} is not a readable tar archive ({e}); download it again or pass an unpacked folder"
            ) from None

    def names(self) -> list[str]:
        try:
            with self._open("r|*") as tf:
                return [m.name + ("/" if m.isdir() else "") for m in tf]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{self.path} is damaged ({e}); download it again") from None

    def stage(self, folders: dict[str, str], out: Path, log: Log = _quiet) -> Iterator[tuple[str, Path]]:
        targets = self._targets(folders)
        dests = {task_id: staging_dir(out, get_task(task_id)) for task_id in folders}
        log(f"extracting {', '.join(folders)} from {self.path.name}")
        try:
            for dest in dests.values():
                dest.mkdir(parents=True)
            with self._open("r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    for target, task_id in targets.items():
                        if member.name.startswith(target):
                            rel = _safe_relative(member.name[len(target) :])
                            if rel is not None:
                                path = dests[task_id].joinpath(*rel.parts)
                                path.parent.mkdir(parents=True, exist_ok=True)
                                src = tf.extractfile(member)
                                if src is not None:
                                    with src, open(path, "wb") as dst:
                                        shutil.copyfileobj(src, dst, 1 << 20)
                            break
        except (tarfile.TarError, EOFError) as e:
            for dest in dests.values():
                shutil.rmtree(dest, ignore_errors=True)
            raise DataError(f"{self.path} is damaged ({e}); download it again") from None
        except BaseException:
            for dest in dests.values():
                shutil.rmtree(dest, ignore_errors=True)
            raise
        pending = dict(dests)
        try:
            for task_id, dest in dests.items():
                pending.pop(task_id)
                yield task_id, dest
        finally:
            for dest in pending.values():
                shutil.rmtree(dest, ignore_errors=True)


def open_source(path: Path) -> Source:
    """A folder, a `.zip`, or a `.tar`/`.tar.gz`/`.tgz`/`.tar.bz2`/`.tar.xz` archive."""
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the downloaded vtab-1k.zip or an unpacked folder")
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES[1:]) or tarfile.is_tarfile(path):
        return TarSource(path)
    raise DataError(
        f"{path} is neither a folder nor a zip or tar archive; pass the downloaded vtab-1k.zip or an unpacked folder"
    )


# -- the whole procedure -----------------------------------------------------------------------------------
def prepare(
    out: Path,
    tasks: list[Task],
    get_source: Callable[[], Source],
    *,
    workers: int = 0,
    log: Log = _quiet,
) -> list[TaskReport]:
    """Make every task in `tasks` valid under `out`: skip, validate in place, or fetch, validate and install.

    `get_source` is called only when some task is neither installed nor valid in place (so an installed
    copy needs no archive and no network). Returns one report per task, in order.
    """
    out = Path(out)
    clean_leftovers(out)
    reports: dict[str, TaskReport] = {}
    pending: list[Task] = []
    for task in tasks:
        done = installed_report(out, task)
        if done is not None:
            reports[task.id] = done
            continue
        existing = task_folders(out, task)
        if len(existing) == 1:
            log(f"{task.id}: validating {existing[0]} in place")
            report = validate_task_dir(existing[0], task, workers=workers)
            if report.ok:
                report.status = IN_PLACE
                install(existing[0], out, report, source={"path": str(existing[0])})
                reports[task.id] = report
                continue
            log(f"{task.id}: {existing[0]} is not valid ({report.problems[0]}); installing it from the source")
        elif existing:
            log(f"{task.id}: several folders in {out} ({', '.join(p.name for p in existing)}); installing it again")
        pending.append(task)
    if pending:
        source = get_source()
        folders = source.locate(pending)
        out.mkdir(parents=True, exist_ok=True)
        for task in pending:
            if task.id not in folders:
                tried = ", ".join(task.names)
                reports[task.id] = TaskReport(
                    task, MISSING, problems=[f"no folder for task {task.id} in {source} (looked for: {tried})"]
                )
        stage = source.stage({t.id: folders[t.id] for t in pending if t.id in folders}, out, log)
        try:
            for task_id, staged in stage:
                task = get_task(task_id)
                try:
                    log(f"{task_id}: validating")
                    report = validate_task_dir(staged, task, display=source.display(folders[task_id]), workers=workers)
                    if report.ok:
                        install(staged, out, report, source=source.provenance())
                finally:
                    if staged.exists():
                        shutil.rmtree(staged, ignore_errors=True)
                reports[task_id] = report
        finally:
            stage.close()
    return [reports[t.id] for t in tasks]


def report_rows(reports: Iterable[TaskReport]) -> list[dict[str, Any]]:
    """One row per task for the report table."""
    rows = []
    for r in reports:
        row: dict[str, Any] = {"task": r.task.id, "group": r.task.group, "classes": r.task.num_classes}
        for split in SPLITS:
            n = r.lines.get(split)
            row[split] = "-" if n is None else n
        n_problems = len(r.problems)
        row["status"] = (
            r.status
            if r.ok or r.status == MISSING
            else f"{r.status} ({n_problems} problem{'s' if n_problems != 1 else ''})"
        )
        rows.append(row)
    return rows
