"""Where a suite's task folders are read from: a folder, a zip or a tar archive (any compression), and which
folder inside it holds the task folders (moved out of `archive.py`, which stages, validates and installs them)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from tasks.catalog import UnknownTaskError, get_task
from tasks.folder import DataError
from tasks.task import Task

STAGING_PREFIX = ".peft-bench-staging-"
MARKER = ".peft-bench-valid.json"
# How deep below the source's top the folder holding the task folders may be (`vtab-1k/` is depth 1).
MAX_ROOT_DEPTH = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

Log = Callable[[str], None]


def quiet(message: str) -> None:
    pass


def staging_dir(out: Path, task: Task) -> Path:
    """A fresh folder name under `out` for staging `task` (the installer validates it there)."""
    return Path(out) / f"{STAGING_PREFIX}{task.id}-{secrets.token_hex(4)}"


def task_of(name: str, suites: Iterable[str] | None = None) -> Task | None:
    """The task a folder name stands for (canonical id or alias, case-insensitive), if any; only a task of
    `suites` when given (a folder inside one suite's dataset may carry another suite's task name)."""
    if not name or name.startswith(".") or name.startswith("__"):
        return None
    try:
        task = get_task(name)
    except UnknownTaskError:
        return None
    return task if suites is None or task.suite in suites else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def _member_name(name: str) -> str:
    """An archive member's name without leading `./` (as `tar -C DIR .` writes them), as `locate` saw it."""
    while name.startswith("./"):
        name = name[2:]
    return name


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

    def dir_names(self) -> set[str]:
        """Lower-case names of the folders near the source's top (as deep as task folders are looked for)."""
        raise NotImplementedError

    def display(self, folder: str) -> str:
        """How messages name the task folder `folder` of this source."""
        raise NotImplementedError

    def stage(self, folders: dict[str, str], out: Path, log: Log = quiet) -> Iterator[tuple[str, Path]]:
        """Copy each task folder into its own staging folder under `out`; yields (task id, staging folder).

        A staging folder not yet yielded is removed when the generator is closed or fails.
        """
        raise NotImplementedError


class FolderSource(Source):
    """An unpacked copy; files are hard-linked into the staging folders when possible, else copied."""

    def locate(self, tasks: Iterable[Task]) -> dict[str, str]:
        tasks = list(tasks)
        suites = {t.suite for t in tasks}
        candidates: dict[str, dict[str, set[str]]] = {}

        def walk(folder: Path, rel: PurePosixPath, depth: int) -> None:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for child in children:
                task = task_of(child.name, suites)
                if task is not None:
                    candidates.setdefault(str(rel) if rel.parts else "", {}).setdefault(task.id, set()).add(child.name)
                elif depth < MAX_ROOT_DEPTH:
                    walk(child, rel / child.name, depth + 1)

        walk(self.path, PurePosixPath(), 0)
        return _choose_root(candidates, tasks)[1]

    def dir_names(self) -> set[str]:
        names: set[str] = set()

        def walk(folder: Path, depth: int) -> None:
            try:
                children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
            except OSError:
                return
            for child in children:
                names.add(child.name.lower())
                if depth < MAX_ROOT_DEPTH:
                    walk(child, depth + 1)

        walk(self.path, 0)
        return names

    def display(self, folder: str) -> str:
        return str(self.path / folder)

    def stage(self, folders: dict[str, str], out: Path, log: Log = quiet) -> Iterator[tuple[str, Path]]:
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

    def _dirs(self) -> set[PurePosixPath]:
        dirs: set[PurePosixPath] = set()
        for name in self.names():
            path = PurePosixPath(name)
            dirs.add(path if name.endswith("/") else path.parent)
        return dirs

    def dir_names(self) -> set[str]:
        return {part.lower() for d in self._dirs() for part in d.parts[: MAX_ROOT_DEPTH + 1]}

    def locate(self, tasks: Iterable[Task]) -> dict[str, str]:
        tasks = list(tasks)
        suites = {t.suite for t in tasks}
        candidates: dict[str, dict[str, set[str]]] = {}
        for d in self._dirs():
            for i, part in enumerate(d.parts[: MAX_ROOT_DEPTH + 1]):
                task = task_of(part, suites)
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

    def stage(self, folders: dict[str, str], out: Path, log: Log = quiet) -> Iterator[tuple[str, Path]]:
        targets = self._targets(folders)
        with self._open() as zf:
            members: dict[str, list[tuple[zipfile.ZipInfo, PurePosixPath]]] = {t: [] for t in folders}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = _member_name(info.filename)
                for target, task_id in targets.items():
                    if name.startswith(target):
                        rel = _safe_relative(name[len(target) :])
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

    def stage(self, folders: dict[str, str], out: Path, log: Log = quiet) -> Iterator[tuple[str, Path]]:
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
                    name = _member_name(member.name)
                    for target, task_id in targets.items():
                        if name.startswith(target):
                            rel = _safe_relative(name[len(target) :])
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


def open_source(path: Path, what: str = "the downloaded vtab-1k.zip") -> Source:
    """A folder, a `.zip`, or a `.tar`/`.tar.gz`/`.tgz`/`.tar.bz2`/`.tar.xz` archive; `what` names what the
    user should pass instead of a wrong path."""
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass {what} or an unpacked folder")
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES[1:]) or tarfile.is_tarfile(path):
        return TarSource(path)
    raise DataError(f"{path} is neither a folder nor a zip or tar archive; pass {what} or an unpacked folder")
