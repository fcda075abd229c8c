"""The Python API: the commands of `peft-bench` as functions, for notebooks and scripts.

    import benchmark.api as pb

    data = pb.synth("synth-data", tasks="camelyon,svhn")
    common = dict(backbone="test_vit", pretrained=False, image_size=32, epochs=2)
    record = pb.run("lora", "svhn", data_root=data, results="results/nb", rank=4, **common)
    pb.bench(["linear", "bitfit"], "camelyon,svhn", seeds=[42], data_root=data, results="results/nb", **common)
    runs = pb.load_results("results/nb")  # one row per run
    boards = pb.leaderboard("results/nb")  # one board per suite; the files are written beside the runs

Each function parses its keyword arguments with the command's own parser and then calls the function the command
calls (`benchmark.commands`): one code path, so the defaults, the checks, the result files and every error are the
command line's. Bad input raises `UserError` with the command's one-line message (which names the command-line
option, e.g. `--epochs`).

Keyword arguments:

- a command-line option of the command, named as the option with `_` for `-`: `epochs=2`, `lr=1e-3`,
  `weight_decay=0.0`, `image_size=32`, `backbone="test_vit"`, `launcher="local"`; None means the command's default;
- a flag takes a bool: `quiet=True`, `save_tunable=True`; `pretrained=False` is `--no-pretrained` and
  `feature_cache=False` is `--no-feature-cache`;
- a comma-separated option also takes a list: `seeds=[42, 44]`, `lr_grid=[0.1, 0.01]`, `tasks=["dtd", "svhn"]`;
- any other keyword is a method option, as `--set key=value`: `rank=4`, `num_tokens=10` (the fields of the method's
  config; one the method does not have is a `UserError` listing those it has).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.cli import build_parsers
from benchmark.commands import reports as reports_command
from benchmark.commands import synth as synth_command
from benchmark.commands import train as train_command
from benchmark.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from methods import PeftModel

__all__ = ["UserError", "bench", "build_model", "leaderboard", "load_results", "parse", "run", "synth"]

# The options no keyword maps to: `--set` is what the other keywords become (and `options` a method's field name).
INTERNAL_DESTS = ("help", "options")


def option_actions(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Each keyword a command's options take: the option's action, and whether the keyword negates a `--no-x` flag.

    A keyword is the option's destination or its long name with `_` for `-` (`slurm_gpus` and `slurm_gpus_per_job`);
    a `--no-x` flag is also keyword `x` with the opposite value."""
    found: dict[str, tuple[argparse.Action, bool]] = {}
    # argparse lists a parser's options only in `_actions`; it has no public accessor.
    for action in parser._actions:
        if not action.option_strings or action.dest in INTERNAL_DESTS:
            continue
        long = next(s for s in action.option_strings if s.startswith("--"))
        for key in {action.dest, long[2:].replace("-", "_")}:
            found[key] = (action, False)
            if action.nargs == 0 and key.startswith("no_"):
                found[key[3:]] = (action, True)
    return found


def text(value: Any) -> str:
    """A value as the command line writes it: lists comma-separated, everything else as `str` gives it."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Path):
        return ",".join(str(v) for v in value)
    return str(value)


def parse(command: str, **kwargs: Any) -> argparse.Namespace:
    """The parsed arguments of `peft-bench <command>` for `kwargs` (see the module's docstring)."""
    parser, commands = build_parsers()
    actions = option_actions(commands[command])
    argv = [command]
    for key, value in kwargs.items():
        if key not in actions:
            argv.append(f"--set={key}={text(value)}")
            continue
        action, negated = actions[key]
        flag = action.option_strings[-1]
        if value is None:
            continue
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise UserError(f"{key} takes True or False, got {value!r}")
            if value != negated:
                argv.append(flag)
        # argparse names its repeatable options' action class only privately.
        elif isinstance(action, argparse._AppendAction) and not isinstance(value, str):
            argv += [f"{flag}={v}" for v in value]  # a repeatable option: once per item
        else:
            argv.append(f"{flag}={text(value)}")  # `=`: a value that starts with `-` stays a value
    return parser.parse_args(argv)


def build_model(method: str, task: str, *, num_classes: int | None = None, **options: Any) -> PeftModel:
    """The model `run` trains, before training: `method` on its frozen backbone, with a head for `task`.

    The task decides the method's per-task settings and, unless `num_classes` is given, the head's classes. The
    keyword arguments are `run`'s (`backbone`, `pretrained`, `weights`, `image_size`, `seed`, ... and method
    options); the backbone's weights are loaded as for a run (downloaded unless `pretrained=False` or `weights`).
    """
    import pytorch_lightning as pl

    from benchmark.run.resolve import build_backbone

    args = parse("run", method=method, task=task, **options)
    resolved, settings, config = train_command.resolve_run(args)
    backbone = build_backbone(config, settings)
    pl.seed_everything(args.seed, workers=True, verbose=False)  # as a run seeds before building its model
    try:
        return config.build(backbone, num_classes or resolved.num_classes)
    except ValueError as e:
        raise UserError(f"{config.name} on {resolved.id}: {e}") from None


def run(
    method: str,
    task: str,
    *,
    data_root: str | Path | None = None,
    results: str | Path | None = None,
    seed: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`peft-bench run`: train `method` on `task` once and write its result file; return the result record.

    The record is the file's content (`status` says whether the run succeeded: a failed run is recorded, not
    raised). None means the command's default (`results/bench`, seed 42, the suite's data folder). Other keyword
    arguments: `run`'s options and method options (the module's docstring).
    """
    args = parse("run", method=method, task=task, data_root=data_root, results=results, seed=seed, **options)
    record, _ = train_command.run(args)
    return record


def bench(
    methods: str | Iterable[str],
    tasks: str | Iterable[str] | None = None,
    *,
    seeds: Iterable[int] | None = None,
    data_root: str | Path | None = None,
    results: str | Path | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """`peft-bench bench`: the resumable sweep of each method over every (task, seed), then the leaderboard.

    Returns the records of the runs this call executed (runs whose result already exists are skipped). `tasks`:
    task ids, a group or `all` (the default). Other keyword arguments: `bench`'s options (e.g. `protocol="grid"`,
    `launcher="local"`, `retry_failed=True`) and method options, set for every method.
    """
    args = parse(
        "bench", method=text(methods), tasks=None if tasks is None else text(tasks), seeds=seeds,
        data_root=data_root, results=results, **options,
    )  # fmt: skip
    return train_command.bench(args)


def load_results(results: str | Path) -> pd.DataFrame:
    """The runs of a results directory, one row each, as the leaderboard reads them: method, protocol, task,
    group, seed, status, acc (the reported accuracy), tunable, head and backbone parameters, speed, memory."""
    from benchmark.report.leaderboard import runs_frame
    from benchmark.run.results import load_results as load_records

    return runs_frame(load_records(reports_command.results_dir(results)))


def leaderboard(results: str | Path, **options: Any) -> dict[str, pd.DataFrame]:
    """`peft-bench leaderboard`: write the tables, plot and page of a results directory; return each suite's
    board by suite id (`vtab1k`, `fgvc`). Keyword arguments: `reported="methods"|"all"`, `reference`, `suite`.

    The files are `leaderboard.md` and `leaderboard.html`, and per suite a CSV and a PNG (VTAB-1k:
    `leaderboard.csv`, `accuracy_vs_params.png`; FGVC: `leaderboard-fgvc.csv`, `accuracy_vs_params-fgvc.png`).
    """
    return reports_command.leaderboard(parse("leaderboard", results=results, **options))


def synth(out: str | Path, tasks: str | Iterable[str] | None = None, **options: Any) -> Path:
    """`peft-bench synth`: synthetic tasks in their suite's real layout under `out`; returns `out` (a data root).

    `tasks`: task ids, a group or `all` (the default). Keyword arguments: `suite`, `per_class`, `image_size`, `seed`.
    """
    path, _ = synth_command.synth(parse("synth", out=out, tasks=None if tasks is None else text(tasks), **options))
    return path
