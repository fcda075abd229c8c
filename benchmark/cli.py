"""`peft-bench <command>` (= `python -m benchmark <command>`): parses the command line and dispatches to
`benchmark.commands`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from benchmark.commands import COMMAND_MODULES
from benchmark.commands.options import Parser
from benchmark.core.errors import Interrupted, UserError
from benchmark.core.signals import interruptible
from tasks.atomic import DISK_FULL

# The console script's name; usage lines and `--help` show it however the program was started.
PROG = "peft-bench"


def build_parser() -> Parser:
    return build_parsers()[0]


def build_parsers() -> tuple[Parser, dict[str, Parser]]:
    """The program's parser, and each command's own parser by name (the Python API, `benchmark.api`, reads their
    options)."""
    parser = Parser(prog=PROG, description="peft-bench: PEFT methods for ViTs on VTAB-1k and FGVC.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    parser.set_defaults(main=main)  # `batch` runs other commands through it, in its worker processes
    return parser, dict(sub.choices)


def entry_point() -> NoReturn:
    """The `peft-bench` console script and `python -m benchmark`: exit with `main`'s status."""
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with interruptible():
            args = build_parser().parse_args(argv)
            return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(
            f"stopped by {name}: finished runs are saved, the run in flight was not recorded, and the same command "
            "resumes",
            file=sys.stderr,
        )
        return e.exit_code
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): what it wanted it has; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
        return 2


def disk_full_message(e: OSError) -> str:
    """One line for a full disk: which file, how much space is left where it was written, what to do."""
    where = Path(e.filename) if e.filename else None
    free = ""
    probe = where
    while probe is not None and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe is not None:
        free = f", {shutil.disk_usage(probe).free / 2**20:.0f} MiB free there"
    target = f"writing {where}" if where else "writing"
    return (
        f"no space left on the device {target}{free}; nothing partial was kept: free some space (or pass another "
        "--results), then run the same command again"
    )
