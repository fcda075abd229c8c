"""A suite's task folders from a zip, tar or folder (VTAB-1k's community archive, FGVC's datasets in VPT's
layout): find them, stage, validate, install.

Pure data handling: no downloads, no command line. Problems with a task are collected as one-line
messages in its `TaskReport`; problems with the source as a whole raise `DataError`.

Install protocol, so that an interrupted run never leaves a task that later passes as valid:

1. the task's folder is extracted (or hard-linked/copied) into `<out>/.peft-bench-staging-<task>-<random>`;
2. it is validated there: every split file of its suite, its size (`Task.split_sizes`: VTAB-1k's 800 / 200 /
   1,000 / the task's test size lines, FGVC's entries of VPT's JSON splits), labels in [0, C) (FGVC: the
   train split's distinct class ids are the task's classes), every listed image present and decodable;
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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_write_bytes
from tasks.catalog import get_task
from tasks.fgvc_sources import SPLIT_COPY, images_from, kaggle_cars, splits_from, where_to_get
from tasks.folder import DataError, decode_image
from tasks.json_split import CLASS_TABLE_SPLIT
from tasks.sources import MARKER, STAGING_PREFIX, Log, Source, quiet
from tasks.splits import read_split, split_file_name
from tasks.task import Task

OLD_PREFIX = ".peft-bench-old-"
MARKER_VERSION = 1
MAX_IMAGE_PROBLEMS = 10


def _count_entries(raw: bytes, layout: str) -> int | None:
    """Lines of a `txt` split file; entries of a `json` one (None when it is not one JSON object)."""
    text = raw.decode("utf-8-sig", errors="replace")
    if layout == "txt":
        return sum(1 for line in text.splitlines() if line.strip())
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return len(data) if isinstance(data, dict) else None


def advice(task: Task, what: Callable[[Task], str] = where_to_get) -> str:
    """Where to get what a task lacks (`what`: its split files, its images, or both), as a clause ending a
    problem; empty for VTAB-1k, whose messages say it once for the whole archive."""
    return f"; {what(task)}" if task.suite == "fgvc" else ""


def _size_problem(name: str, task: Task, split: str, found: int) -> str:
    expected = task.split_sizes[split]
    unit = "lines" if task.suite_info.layout == "txt" else "entries"
    diff = found - expected
    how = f"{abs(diff)} {'more' if diff > 0 else 'fewer'}"
    copy = f"; {SPLIT_COPY}" if task.suite == "fgvc" else ""
    return f"{name}: expected {expected} {unit}, found {found} ({how}){copy}"


def _dir_names(folder: Path) -> set[str]:
    """Lower-case names of the folders directly under `folder`."""
    try:
        return {p.name.lower() for p in folder.iterdir() if p.is_dir()}
    except OSError:
        return set()


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
    """Check a task folder: every split file of its suite present, its size, its entries and labels, every image
    decodes (and, for FGVC, the image folder is there and Stanford Cars is not Kaggle's copy).

    Messages name files as `display` instead of `task_dir` (the staging folder is gone by the time the
    user reads them). The report's status is FAILED when there is any problem, else INSTALLED.
    """
    task_dir = Path(task_dir)
    shown = display or str(task_dir)

    def rewrite(message: str) -> str:
        return message.replace(str(task_dir), shown)

    report = TaskReport(task)
    splits = task.suite_info.splits
    # A wrong copy or no image folder: every image would be missing; one line says why instead, and the split
    # files are checked without their images.
    check_files = True
    wrong = kaggle_cars(task, _dir_names(task_dir))
    if wrong is not None:
        report.problems.append(f"{shown}: {wrong}")
        check_files = False
    elif task.image_root and not (task_dir / task.image_root).is_dir():
        report.problems.append(f"{shown}/{task.image_root}/ (the image folder) is missing{advice(task, images_from)}")
        check_files = False
    images: dict[Path, None] = {}
    names = {s: split_file_name(task, s) for s in splits}
    missing = [names[s] for s in splits if not (task_dir / names[s]).is_file()]
    if missing:  # one line for all of them
        what = f"{shown}/{missing[0]} is" if len(missing) == 1 else f"{shown}: {', '.join(missing)} are"
        needed = ", ".join(names.values())
        report.problems.append(f"{what} missing (task {task.id} needs {needed}){advice(task, splits_from)}")
    # Every JSON split's labels come from train.json: without it, the splits are only counted.
    counts_only = task.suite_info.layout == "json" and names.get(CLASS_TABLE_SPLIT) in missing
    for split in splits:
        name = names[split]
        path = task_dir / name
        if not path.is_file():
            report.lines[split] = None
            continue
        raw = path.read_bytes()
        report.sha256[split] = hashlib.sha256(raw).hexdigest()
        found = report.lines[split] = _count_entries(raw, task.suite_info.layout)
        if found is not None and found != task.split_sizes[split]:
            report.problems.append(_size_problem(f"{shown}/{name}", task, split, found))
        if counts_only:
            continue
        try:
            split_file = read_split(task_dir, task, split, check_files=check_files)
        except DataError as e:
            report.problems.append(rewrite(str(e)))
            continue
        if check_files:
            images.update(dict.fromkeys(split_file.images))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        bad = [p for p in pool.map(_image_problem, images, chunksize=64) if p is not None]
    report.problems.extend(rewrite(p) for p in bad[:MAX_IMAGE_PROBLEMS])
    if len(bad) > MAX_IMAGE_PROBLEMS:
        report.problems.append(f"{len(bad) - MAX_IMAGE_PROBLEMS} more unreadable images in {shown}")
    # Every split reads train.json's class table: its problem is said once, not once per split.
    report.problems = list(dict.fromkeys(report.problems))
    report.status = FAILED if report.problems else INSTALLED
    return report


# -- the marker --------------------------------------------------------------------------------------------
def write_marker(task_dir: Path, report: TaskReport, source: dict[str, str]) -> None:
    payload = {
        "version": MARKER_VERSION,
        "task": report.task.id,
        "checked": "split files present, their sizes, labels, every image decoded",
        "source": source,
        # `lines`: the split's size (a JSON split's entries).
        "splits": {s: {"sha256": report.sha256[s], "lines": report.lines[s]} for s in report.task.suite_info.splits},
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
        for split in task.suite_info.splits:
            path = dest / split_file_name(task, split)
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != splits[split]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(task_folders(out, task)) != 1:
        return None
    return TaskReport(
        task,
        UP_TO_DATE,
        lines={s: splits[s]["lines"] for s in task.suite_info.splits},
        sha256={s: splits[s]["sha256"] for s in task.suite_info.splits},
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


# -- the whole procedure -----------------------------------------------------------------------------------
def prepare(
    out: Path,
    tasks: list[Task],
    get_source: Callable[[], Source | None],
    *,
    workers: int = 0,
    log: Log = quiet,
) -> list[TaskReport]:
    """Make every task in `tasks` valid under `out`: skip, validate in place, or fetch, validate and install.

    `get_source` is called only when some task is neither installed nor valid in place (so an installed
    copy needs no archive and no network); it returns None when there is no source (FGVC without `--from`):
    then such a task keeps the problems of its folder under `out`, or is reported missing with where to get
    it. Returns one report per task, in order.
    """
    out = Path(out)
    clean_leftovers(out)
    reports: dict[str, TaskReport] = {}
    in_place: dict[str, TaskReport] = {}
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
            in_place[task.id] = report
        elif existing:
            log(f"{task.id}: several folders in {out} ({', '.join(p.name for p in existing)}); installing it again")
        pending.append(task)
    source = get_source() if pending else None
    if pending and source is None:
        for task in pending:
            reports[task.id] = in_place.get(task.id) or TaskReport(
                task, MISSING, problems=[f"not in {out} and no --from given{advice(task)}"]
            )
    elif pending and source is not None:
        folders = source.locate(pending)
        out.mkdir(parents=True, exist_ok=True)
        for task in pending:
            if task.id not in folders:
                tried = ", ".join(task.names)
                why = kaggle_cars(task, source.dir_names()) if task.id == "stanfordcars" else None
                reports[task.id] = TaskReport(
                    task,
                    MISSING,
                    problems=[
                        f"no folder for task {task.id} in {source} (looked for: {tried})"
                        + (f"; {why}" if why else advice(task))
                    ],
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
        for split in r.task.suite_info.splits:
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
