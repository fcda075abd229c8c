"""SIGTERM and SIGINT end a command cleanly: `Interrupted` is raised where the program is, so every `finally`
(claims released, temporary files removed, progress bars closed) runs, and `cli.main` exits 143 or 130.

Lightning's own handling would otherwise decide: on SIGTERM it stops training at the end of the batch and
returns normally (the run then looks finished), and on Ctrl-C it calls `sys.exit(1)`. Lightning keeps a
SIGTERM handler that is already installed and calls it after its own, and lets any other exception raised
inside `fit` propagate after its teardown, which is what this relies on.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

from benchmark.core.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Interrupted`; the previous handlers are restored after."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
