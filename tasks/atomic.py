"""Atomic file writes, shared by every part of the suite that writes files (tasks and benchmark)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# The process's umask, read once (reading it means setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
# A full disk, or a full quota: the write cannot succeed until space is freed.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write `data` to `path` through a temporary file and a rename; leave an identical file untouched.

    Returns whether the file was written.
    """
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what `open` would have given, not mkstemp's private 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in DISK_FULL and e.filename != str(path):
            # Name the file being written, not the temporary one, in what the user sees.
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
