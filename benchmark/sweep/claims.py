"""Claims: a run is claimed atomically before it starts, so that no two processes ever run it at once.

A claim is a small JSON file beside the run's result (`<result>.claim`), created exclusively and complete
(written to a temporary file, then `os.link`ed into place: atomic on local and NFS file systems, and never
over an existing claim), holding its owner (`benchmark.run.schema.ClaimOwner`): host, pid, user, SLURM job
id and restart count (when inside a job), start time and a heartbeat that the owner refreshes while the run
is in flight. Since no claim is ever seen half-written, one that does not validate (empty, garbage, a date
where the heartbeat's seconds belong) is corrupt and stale at once.
Whoever holds the claim is the only one who may write the result: it re-checks the result's identity
under the claim, right before the atomic rename (`sweep.Sweep.run`). The claim is removed after the
result is written, or when the run is abandoned.

A claim whose owner is gone is stale and may be taken over: a dead pid on this host; on another host, a
SLURM job of ours that has left the queue or is pending again (asked of the one cached `squeue` snapshot
the whole process shares, `benchmark.sweep.slurm`); an earlier incarnation of this very SLURM job (it was
requeued since); a heartbeat older than `stale_after` seconds (any host); or a corrupt claim file. Taking over renames the stale
file away, then reads the moved file back: when it is no longer the owner that was judged stale (another
process replaced the stale claim with its own in between), it is put back (`os.link`, which never
overwrites) and the claim counts as live. What this cannot undo: a third process creating a claim in the
instant between that rename and the put-back; the owner whose claim was moved then finds, through
`Claim.held`, that it lost the claim before it writes its result.

No library offers this (file locks through `fcntl` do not survive NFS or a SLURM node failure reliably,
and leave no record of who held them), so it is written here.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from benchmark.run.schema import CLAIM
from benchmark.run.schema import problem as schema_problem
from benchmark.sweep.slurm import Queue, shared_queue

CLAIM_SUFFIX = ".claim"
# A heartbeat older than this (seconds) marks a claim stale whatever its host; the owner beats every
# HEARTBEAT_EVERY seconds, so only a dead or frozen owner misses that many.
STALE_AFTER = 600.0
HEARTBEAT_EVERY = 30.0


def claim_path(result: Path) -> Path:
    return result.with_name(result.name + CLAIM_SUFFIX)


def _owner() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": _user(),
        "slurm_job_id": _slurm_job_id(),
        "slurm_restarts": _slurm_restarts(),
        "started": now,
        "heartbeat": now,
    }


def _slurm_job_id() -> str | None:
    """`<array job>_<task>` inside an array task (what `squeue -j` takes), else the plain job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _slurm_restarts() -> int:
    """How often SLURM has requeued the job this process runs in (0 outside a job)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(count) if count.isdigit() else 0


def _user() -> str | None:
    with contextlib.suppress(Exception):  # no passwd entry (some containers): the user is unknown
        return getpass.getuser()
    return None


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner recorded in a claim file (validated against `benchmark.run.schema.ClaimOwner`); None when it is
    gone. A claim is never seen half-written (`try_claim` links a complete file into place, a heartbeat replaces
    it), so one that does not validate is corrupt: it reads as an owner with no host or pid and an `unreadable`
    reason, which `stale_reason` judges stale at once."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:  # not ours to read (permissions): judged by its age alone, as the owner may be alive
        return _unreadable(path, None)
    if not text.strip():
        return _unreadable(path, "it is empty")
    try:
        CLAIM.validate_json(text)
    except ValidationError as e:
        return _unreadable(path, schema_problem(e))
    return json.loads(text)


def _unreadable(path: Path, why: str | None) -> dict[str, Any] | None:
    """An owner for a claim file whose content is unknown, dated by the file; `why` it is corrupt (None: unknown)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    owner = {"host": None, "pid": None, "slurm_job_id": None, "started": mtime, "heartbeat": mtime}
    return {**owner, "unreadable": why} if why else owner


def owner_label(owner: dict[str, Any]) -> str:
    """Who holds a claim, for messages: `host:pid` (an unknown owner when the claim file cannot tell)."""
    host, pid = owner.get("host"), owner.get("pid")
    return "an unknown owner" if host is None and pid is None else f"{host}:{pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: dict[str, Any], *, stale_after: float = STALE_AFTER, queue: Queue | None = None) -> str | None:
    """Why a claim's owner is gone (None when it may still be running). SLURM is asked through `queue` (the
    process's shared snapshot by default), never once per claim."""
    if owner.get("unreadable"):
        return f"the claim file is unreadable: {owner['unreadable']}; treated as stale"
    age = time.time() - float(owner.get("heartbeat") or owner.get("started") or 0.0)
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old"
    job = owner.get("slurm_job_id")
    if job and job == _slurm_job_id() and int(owner.get("slurm_restarts") or 0) < _slurm_restarts():
        # Requeued after a kill that left no time to release (node failure, SIGKILL): the claim is our own,
        # from before; SLURM lists the job as running, but that is us.
        return f"it is SLURM job {job}'s own, from before the job was requeued"
    host, pid = owner.get("host"), owner.get("pid")
    if host == socket.gethostname() and pid is not None:
        if pid == os.getpid() or _pid_alive(int(pid)):
            return None
        return f"process {pid} on {host} is gone"
    if job and owner.get("user", _user()) == _user():  # `squeue --me` lists our own jobs only
        return (queue or shared_queue()).gone(str(job), since=float(owner.get("started") or 0.0))
    return None


def same_owner(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two reads of a claim are the same claim (a heartbeat changes neither)."""
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "started"))


def take_over(path: Path, judged: dict[str, Any]) -> bool:
    """Remove the claim at `path` that was judged stale as `judged`: True when it is gone, False when the file
    found there was a newer, live claim (put back in place)."""
    grave = path.with_name(f".{path.name}.stale.{os.getpid()}.{time.time_ns()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True  # released meanwhile
    moved = read_owner(grave)
    if moved is None or same_owner(moved, judged):
        grave.unlink(missing_ok=True)
        return True
    with contextlib.suppress(FileExistsError):  # someone claimed it in between: theirs stays, see above
        os.link(grave, path)
    grave.unlink(missing_ok=True)
    return False


@dataclass
class Claim:
    """A held claim on one run's result path; beats its heartbeat in a daemon thread until released."""

    result: Path
    path: Path
    owner: dict[str, Any]
    reclaimed_from: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start_heartbeat(self, every: float = HEARTBEAT_EVERY) -> None:
        def beat() -> None:
            while not self._stop.wait(every):
                self.beat()

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.result.name}", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Refresh the heartbeat (only while the claim file is still ours)."""
        current = read_owner(self.path)
        if current is None or current.get("pid") != self.owner["pid"] or current.get("host") != self.owner["host"]:
            return
        self.owner["heartbeat"] = time.time()
        _write_owner(self.path, self.owner)

    def held(self) -> bool:
        current = read_owner(self.path)
        return (
            current is not None
            and current.get("pid") == self.owner["pid"]
            and current.get("host") == self.owner["host"]
            and current.get("started") == self.owner["started"]
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner_text(owner: dict[str, Any]) -> str:
    """A claim file's content, validated: an owner that violates the schema is a bug, raised before any write."""
    text = json.dumps(owner)
    try:
        CLAIM.validate_json(text)
    except ValidationError as e:
        raise ValueError(f"refusing to write an invalid claim: {schema_problem(e)}") from None
    return text


def _write_owner(path: Path, owner: dict[str, Any]) -> None:
    """Rewrite a claim we hold (heartbeat): through a temporary file and a rename, never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(owner_text(owner))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Create the claim file holding `owner`, complete, unless one exists (False): written to a temporary file,
    then linked into place (`os.link` never overwrites, and is atomic on local and NFS file systems), so no reader
    ever sees a claim half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new.tmp")
    try:
        tmp.write_text(owner_text(owner))
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def try_claim(result: Path, *, stale_after: float = STALE_AFTER, heartbeat: bool = True) -> Claim | None:
    """Claim `result` for this process: a `Claim`, or None when a live owner holds it.

    A stale claim is taken over (the returned claim's `reclaimed_from` says whose and why).
    """
    path = claim_path(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    reclaimed = None
    for _ in range(3):
        owner = _owner()
        try:
            created = _create(path, owner)
        except FileNotFoundError:  # the temporary file was removed (`clean_orphans`) before the link: again
            continue
        if not created:
            current = read_owner(path)
            if current is None:
                continue  # released meanwhile: try again
            why = stale_reason(current, stale_after=stale_after)
            if why is None or not take_over(path, current):
                return None
            reclaimed = f"{owner_label(current)} ({why})"
            continue
        claim = Claim(result, path, owner, reclaimed_from=reclaimed)
        if heartbeat:
            claim.start_heartbeat()
        return claim
    return None


@contextlib.contextmanager
def claimed(result: Path, *, wait: float = 0.0, poll: float = 2.0, stale_after: float = STALE_AFTER):
    """Hold the claim on `result` for the block (None when a live owner holds it for more than `wait` s)."""
    deadline = time.monotonic() + wait
    claim = try_claim(result, stale_after=stale_after)
    while claim is None and time.monotonic() < deadline:
        time.sleep(poll)
        claim = try_claim(result, stale_after=stale_after)
    try:
        yield claim
    finally:
        if claim is not None:
            claim.release()


def clean_orphans(directory: Path, *, stale_after: float = STALE_AFTER) -> list[Path]:
    """Remove what killed writers left under `directory`: stale claims and orphan temporary files.

    A temporary file (`.*.tmp`, as the atomic writers name them) is an orphan when no live claim is held
    in its folder (every writer holds the claim of the run it writes for, in that folder) or when it has
    not been touched for `stale_after` seconds. Returns what was removed.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    live_dirs: set[Path] = set()
    for claim_file in directory.rglob(f"*{CLAIM_SUFFIX}"):
        owner = read_owner(claim_file)
        if owner is None:
            continue
        if stale_reason(owner, stale_after=stale_after) is None or not take_over(claim_file, owner):
            live_dirs.add(claim_file.parent)
        else:
            removed.append(claim_file)
    now = time.time()
    for tmp in directory.rglob(".*.tmp"):
        try:
            age = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if tmp.parent in live_dirs and age < stale_after:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
