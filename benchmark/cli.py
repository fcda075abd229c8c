"""`python -m benchmark <command>`: parses the command line and dispatches to `benchmark.commands`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from benchmark.commands import COMMAND_MODULES
from benchmark.commands._options import Parser
from benchmark.errors import UserError


def build_parser() -> Parser:
    parser = Parser(prog="python -m benchmark", description="peft-bench: PEFT methods for ViTs on VTAB-1k.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are saved, and the same command resumes", file=sys.stderr)
        return 130
