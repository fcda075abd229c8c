"""`batch`: several `python -m benchmark` commands in a few long-lived processes, e.g. the demo's per-group sweeps.

Each command runs exactly as it would on its own (`benchmark.cli.main` on its arguments), in one of `--jobs` worker
processes that each import the libraries once and then take the next command from the queue, in the order given
(longest first keeps the queues even). Started with `spawn`, so no worker inherits the parent's torch threads.
At the end it prints each command's wall time (the arguments every command shares once, then what sets each apart),
the runs' time per method of `--results` when given, and its own.
A failing command does not stop the others; the exit status is the worst one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmark.commands.options import positive_int
from benchmark.core.errors import UserError


def run_command(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, float]:
    """One command in this worker process through the CLI's `main`: (exit status, wall seconds)."""
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit
        code = e.code if isinstance(e.code, int) else 2
    sys.stdout.flush()
    sys.stderr.flush()
    return code, time.perf_counter() - t0


def method_times(results: Path) -> dict[str, tuple[int, float]]:
    """Per method: (runs, summed wall time of its runs) over the result files under `results/runs`."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for path in sorted((results / "runs").rglob("*.json")):
        if path.parent.name == "decisions":
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "wall_time_s" in record:
            method = record.get("method") or record.get("config", {}).get("method", "?")
            totals[method][0] += 1
            totals[method][1] += float(record["wall_time_s"] or 0.0)
    return {m: (int(n), s) for m, (n, s) in totals.items()}


def shared_arguments(commands: list[list[str]]) -> tuple[int, int]:
    """How many leading and trailing arguments every command shares (0, 0 for a single command), so that the
    listing of times can print them once and each command by what sets it apart."""
    if len(commands) < 2:
        return 0, 0
    shortest = min(len(c) for c in commands)
    head = 0
    while head < shortest and len({c[head] for c in commands}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head and len({c[-1 - tail] for c in commands}) == 1:
        tail += 1
    return head, tail


def cmd_batch(args: argparse.Namespace) -> int:
    commands = [shlex.split(c) for c in args.command]
    if any(c and c[0] == "batch" for c in commands):
        raise UserError("a batch command cannot run `batch` itself; list the commands it should run")
    t0 = time.perf_counter()
    done: dict[int, tuple[int, float]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(commands)), mp_context=context) as pool:
        futures = {pool.submit(run_command, args.main, argv): i for i, argv in enumerate(commands)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                done[i] = future.result()
            except Exception as e:  # a worker that died (killed, out of memory): say which command
                print(f"batch: `{args.command[i]}` died ({type(e).__name__}: {e})", file=sys.stderr)
                done[i] = (1, float("nan"))
    wall = time.perf_counter() - t0
    head, tail = shared_arguments(commands)
    if head or tail:
        first = commands[0]
        shared = " ".join(
            part for part in (shlex.join(first[:head]), "…", shlex.join(first[len(first) - tail :])) if part
        )
        print(f"\nevery command: {shared}, where … is as listed")
    print("\ncommand times (s):")
    for i, argv in enumerate(commands):
        code, seconds = done[i]
        own = (shlex.join(argv[head : len(argv) - tail]) or "(nothing more)") if head or tail else args.command[i]
        print(f"  {seconds:7.1f}  {'ok' if code == 0 else f'exit {code}'}  {own}")
    if args.results is not None and (times := method_times(Path(args.results))):
        print("run time per method (s, summed over its runs):")
        for method, (runs, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1]):
            print(f"  {seconds:7.1f}  {method} ({runs} runs)")
    print(f"batch: {len(commands)} command(s) in {wall:.0f} s wall with {args.jobs} job(s)")
    return max((code for code, _ in done.values()), default=0)


def register(sub: Any) -> None:
    """Add `batch` to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "batch",
        help="run several commands in a few long-lived processes and print their times (used by make demo)",
        description="Example: python -m benchmark batch --jobs 2 --command 'bench --method lora --tasks eurosat ...' "
        "--command 'bench --method vpt_deep --tasks eurosat ...' --results results/demo",
    )
    p.add_argument("--command", action="append", required=True, metavar="ARGS",
                   help="one command's arguments after `python -m benchmark` (repeat; run in this order)")  # fmt: skip
    p.add_argument("--jobs", type=positive_int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--results", metavar="DIR", help="also print the runs' time per method found in this directory")
    p.set_defaults(func=cmd_batch)
