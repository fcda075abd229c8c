"""`python -m benchmark <command>`: methods, tasks, params, synth, run, bench, leaderboard, compare, reproduce."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmark import export
from benchmark.errors import UserError
from tasks import UnknownTaskError, parse_tasks

DEFAULT_DATA_ROOT = os.environ.get("VTAB_ROOT") or "~/.cache/peft-bench/vtab-1k"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong, and where the help is."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _number(cast: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: `cast` the text, then require `ok` of the value; the error names `what` it must be."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return list(dict.fromkeys(values))


def float_list(parse: Callable[[str], float]) -> Callable[[str], tuple[float, ...]]:
    def parse_list(text: str) -> tuple[float, ...]:
        return tuple(parse(x) for x in text.split(",") if x.strip())

    return parse_list


def _method(name: str):
    import methods

    try:
        return methods.get_method(name)
    except methods.UnknownMethodError as e:
        raise UserError(str(e)) from None


def _tasks(spec: str):
    try:
        return parse_tasks(spec)
    except UnknownTaskError as e:
        raise UserError(str(e)) from None


# -- shared option groups ---------------------------------------------------------------------------------
def _one_task(spec: str, several: str = "pick one") -> Any:
    tasks = _tasks(spec)
    if len(tasks) != 1:
        raise UserError(f"{spec!r} names {len(tasks)} tasks, this command takes one; {several}")
    return tasks[0]


def _backbone_options(p: argparse.ArgumentParser) -> None:
    from benchmark.backbone import DEFAULT_BACKBONE, NORMALIZATIONS

    g = p.add_argument_group("backbone and preprocessing")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm ViT name (default: %(default)s)")
    g.add_argument("--no-pretrained", action="store_true", help="random weights instead of the pretrained ones")
    g.add_argument("--weights", metavar="FILE", help="local checkpoint (.safetensors, .pth, or Google's .npz)")
    g.add_argument("--image-size", type=positive_int, help="input side in pixels (default: the backbone's)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    g.add_argument("--normalization", choices=tuple(NORMALIZATIONS), default="imagenet")
    g.add_argument("--precision", choices=("32", "bf16"), default="32", help="fp32, or bf16 autocast (GPUs)")
    g.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="train frozen-feature methods (linear) end to end instead of on features computed once",
    )
    g.add_argument("--eval-batch-size", type=positive_int, default=256)
    g.add_argument("--compile", action="store_true", help="run the models through torch.compile")
    g.add_argument(
        "--data-on-device",
        choices=("auto", "on", "off"),
        default="auto",
        help="keep each task's uint8 images on the device (auto: on a GPU, when they fit in a quarter of its "
        "free memory)",
    )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where decoded images are cached (default: $PEFT_BENCH_CACHE/arrays or ~/.cache/peft-bench/arrays)",
    )


def _training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the method's recipe)")
    g.add_argument(
        "--protocol",
        choices=("final", "tune", "grid"),
        default="final",
        help="final: train800val200 -> test; tune: train800 -> val200; grid: tune the recipe's "
        "lr x wd grid on val200, then final with the best pair (default: %(default)s)",
    )
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--lr", type=positive_float, help="learning rate (used as given)")
    g.add_argument("--weight-decay", type=nonnegative_float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--lr-grid", type=float_list(positive_float), metavar="X,Y,..", help="lrs for --protocol grid")
    g.add_argument(
        "--wd-grid", type=float_list(nonnegative_float), metavar="X,Y,..", help="weight decays for --protocol grid"
    )
    p.add_argument_group("method").add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
        help="a method option, e.g. --set num_tokens=50 or --set pruned_tokens=drop (repeatable; "
        "the options are the fields of the method's config)",
    )  # fmt: skip


def _settings(args: argparse.Namespace):
    from benchmark.backbone import default_image_size
    from benchmark.runner import Settings

    return Settings(
        backbone=args.backbone,
        pretrained=not args.no_pretrained,
        weights=str(Path(args.weights).expanduser().resolve()) if args.weights else None,
        image_size=args.image_size or default_image_size(args.backbone),
        interpolation=args.interpolation,
        normalization=args.normalization,
        precision=args.precision,
        cache_features=not args.no_feature_cache,
        eval_batch_size=args.eval_batch_size,
        compile=args.compile,
        data_on_device=args.data_on_device,
    )


def _options(args: argparse.Namespace) -> dict[str, str]:
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.protocol == "grid" and (args.lr is not None or args.weight_decay is not None):
        raise UserError("--protocol grid selects lr and weight decay itself; pass --lr-grid/--wd-grid instead")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be non-negative, got {args.warmup_epochs}")
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "lr_grid": args.lr_grid,
        "wd_grid": args.wd_grid,
    }


# -- commands -------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    import methods

    print("\n".join(methods.list_methods()))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks import TASKS

    rows = [
        {
            "task": t.id,
            "group": t.group,
            "classes": t.num_classes,
            "train800": 800,
            "val200": 200,
            "train800val200": 1000,
            "test": t.test_size,
            "folder": t.folder,
            "aliases": ", ".join(t.aliases),
        }
        for t in TASKS
    ]
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from benchmark.backbone import create_backbone

    names = args.methods.split(",") if args.methods else None
    import methods

    configs = [_method(n.strip()) for n in (names or methods.list_methods())]
    tasks = _tasks(args.tasks)
    out = []
    for cls in configs:
        base = cls()
        # The meta device gives every tensor its shape without allocating or initialising it.
        backbone = create_backbone(
            args.backbone, pretrained=False, image_size=args.image_size, device="meta", **base.backbone_kwargs()
        )
        for task in tasks:
            model = base.for_task(task.id).build(copy.deepcopy(backbone), task.num_classes)
            out.append({"method": cls.name, "task": task.id, **model.param_report().as_dict()})
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        import pandas as pd

        print(pd.DataFrame(out).to_string(index=False))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.synth import SynthConfig, write_task

    tasks = _tasks(args.tasks)
    try:
        config = SynthConfig(per_class=args.per_class, image_size=args.image_size, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.out).expanduser()
    from benchmark.results import check_writable

    check_writable(out, option="--out", what="output directory")
    for task in tasks:
        path = write_task(out, task, config)
        logging.getLogger("peft_bench").info("wrote %s", path)
    print(f"{len(tasks)} synthetic task(s) in {out}")
    return 0


def _sweep(args: argparse.Namespace, config: Any, tasks: list, seeds: list[int], *, results: Path,
           **kwargs: Any) -> None:  # fmt: skip
    """`runner.sweep` with the command line's data, cache and progress options, then the leaderboard."""
    from benchmark.leaderboard import write_leaderboard
    from benchmark.runner import sweep

    executed = sweep(
        config,
        tasks,
        seeds,
        data_root=Path(args.data_root).expanduser(),
        results=results,
        cache_dir=args.cache_dir,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
        run_progress=args.run_progress,
        save_tunable=getattr(args, "save_tunable", False),
        **kwargs,
    )
    write_leaderboard(results)
    failed = sum(r["status"] != "ok" for r in executed)
    print(f"{len(executed)} run(s) executed, {failed} failed; leaderboard in {results / 'leaderboard.md'}")


def cmd_bench(args: argparse.Namespace) -> int:
    cls = _method(args.method)
    _sweep(
        args, cls(), _tasks(args.tasks), args.seeds, results=Path(args.results).expanduser(),
        protocol=args.protocol, settings=_settings(args), options=_options(args), recipe_overrides=_overrides(args),
    )  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.backbone import create_backbone
    from benchmark.results import check_writable, run_path, write_json
    from benchmark.runner import PROTOCOL_SPLITS, RunSpec, execute, prepare_data

    cls = _method(args.method)
    task = _one_task(args.task, several="use `bench` for several")
    if args.protocol == "grid":
        raise UserError("`run` trains once; use `bench --protocol grid` for the grid search")
    settings = _settings(args)
    try:
        config = cls().for_task(task.id).with_options(_options(args)).with_recipe(**_overrides(args))
    except ValueError as e:
        raise UserError(f"{cls.name}: {e}") from None
    data = prepare_data(Path(args.data_root).expanduser(), [task], PROTOCOL_SPLITS[args.protocol], settings,
                        args.cache_dir)  # fmt: skip
    out = (
        Path(args.out).expanduser()
        if args.out
        else run_path(Path(args.results), cls.name, task.id, args.protocol, args.seed)
    )
    if args.out:
        check_writable(out.parent, option="--out", what="output directory")
    else:
        check_writable(out.parent)
    backbone = create_backbone(
        settings.backbone,
        pretrained=settings.pretrained,
        weights=settings.weights,
        image_size=settings.image_size,
        **config.backbone_kwargs(),
    )
    try:
        config.check_backbone(backbone)
    except ValueError as e:
        raise UserError(f"{cls.name}: {e}") from None
    spec = RunSpec(config, task, args.seed, args.protocol, args.protocol, settings,
                   save_state=out.with_suffix("") if args.save_tunable else None)  # fmt: skip
    record = execute(spec, backbone, data, progress=not args.quiet)
    write_json(out, record)
    acc = record["test_acc"] if args.protocol == "final" else record["val_acc"]
    if record["status"] != "ok":
        print(f"run failed: {record['error']} (recorded in {out})", file=sys.stderr)
        return 1
    print(
        f"{cls.name} on {task.id} seed {args.seed}: {'test' if args.protocol == 'final' else 'val200'} "
        f"accuracy {acc:.2f}% -> {out}"
    )
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from benchmark.demo import pretrain
    from benchmark.results import check_writable

    out = Path(args.out).expanduser()
    if out.is_file() and not args.force:
        print(f"{out} exists; pass --force to pretrain again")
        return 0
    check_writable(out.parent, option="--out", what="output directory")
    report = pretrain(out, images=args.images, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    accuracy = ", ".join(
        f"{k} {v:.1f}% (chance {report['chance'][k]:.1f}%)" for k, v in report["upstream_val_accuracy"].items()
    )
    print(f"pretrained {report['backbone']} in {report['total_s']:.0f} s: upstream val accuracy {accuracy} -> {out}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.leaderboard import markdown, write_leaderboard
    from benchmark.reference import load_reference

    results = Path(args.results).expanduser()
    if not (results / "runs").is_dir():
        raise UserError(
            f"no results in {results} (expected {results / 'runs'}); run `python -m benchmark bench` first"
        )
    reference = load_reference(args.reference) if args.reported or args.reference else None
    board = write_leaderboard(results, reference=reference, reported=args.reported or "methods")
    print(markdown(board))
    return 0


def _method_names(text: str | None) -> list[str] | None:
    """`--method a,b`: registered method names (an unknown one is an error), or None for all."""
    if not text:
        return None
    return list(dict.fromkeys(_method(n.strip()).name for n in text.split(",") if n.strip()))


def cmd_compare(args: argparse.Namespace) -> int:
    from benchmark.compare import compare
    from benchmark.compare_report import summary_lines, write_comparison
    from benchmark.reference import load_reference
    from benchmark.results import check_writable

    reference = load_reference(args.reference)
    results = Path(args.results).expanduser()
    if args.table:
        from benchmark.compare_table import write_table

        check_writable(results)
        md, text = write_table(results, reference, args.table)
        print(f"{text}\ntable in {md} and {md.with_suffix('.csv')}")
        return 0
    comparison = compare(results, reference, methods=_method_names(args.method), sources=args.source)
    check_writable(results)
    md, csv = write_comparison(comparison)
    print("\n".join([*summary_lines(comparison), f"comparison in {md} and {csv}"]))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses

    from benchmark.compare import check_sources, compare
    from benchmark.compare_report import summary_lines, write_comparison
    from benchmark.reference import load_reference
    from benchmark.reproduce import plan_reproduction

    reference = load_reference(args.reference)
    cls = _method(args.method)
    plan = plan_reproduction(cls(), args.budget, _tasks(args.tasks), reference, epochs=args.epochs,
                             cache_features=not args.no_feature_cache)  # fmt: skip
    check_sources(reference, [cls.name], args.source)  # before hours of training, not after
    if args.plan:
        print(plan.describe())
        return 0
    results = Path(args.results or f"results/reproduce/{cls.name}-{args.budget}").expanduser()
    settings = dataclasses.replace(_settings(args), budget=args.budget)
    _sweep(
        args, cls(), [tp.task for tp in plan.tasks], list(plan.seeds), results=results,
        protocol=plan.protocol.protocol, settings=settings, options=plan.options, task_overrides=plan.task_overrides(),
    )  # fmt: skip
    try:
        comparison = compare(results, reference, methods=[cls.name], sources=args.source)
    except UserError as e:
        print(f"nothing to compare: {e}", file=sys.stderr)
        return 1
    md, csv = write_comparison(comparison)
    print("\n".join([*summary_lines(comparison), f"comparison in {md} and {csv}"]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from benchmark import vtab_data

    return vtab_data.run(
        _tasks(args.tasks),
        out=Path(args.out) if args.out else None,
        source=Path(args.source) if args.source else None,
        revision=args.revision,
        image_size=args.image_size,
        interpolation=args.interpolation,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        cache=not args.no_cache,
        hf=args.hf,
        workers=args.workers or 0,
    )


def cmd_perf(args: argparse.Namespace) -> int:
    from benchmark import perf

    data_root = Path(args.data_root).expanduser() if args.data_root else None
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else None
    if args.data:
        rows = perf.data_perf(
            _tasks(args.tasks),
            data_root=data_root,
            split=args.split,
            image_size=args.image_size or 224,
            batch_size=args.batch_size or 64,
            epochs=args.epochs,
            workers=args.workers,
            interpolation=args.interpolation,
            cache_dir=cache_dir,
        )
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            if not args.data_root:
                print("data: a synthetic task in a temporary folder (pass --data-root for real data)")
            print(perf.format_rows(rows))
        return 0
    return _model_perf(args, data_root, cache_dir)


def _model_perf(args: argparse.Namespace, data_root: Path | None, cache_dir: Path | None) -> int:
    import torch

    from benchmark import perf, perf_model, perf_report
    from benchmark.backbone import default_image_size
    from benchmark.results import check_writable
    from methods import list_methods

    out = Path(args.out).expanduser()
    check_writable(out, option="--out", what="the perf tables")
    names = list_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = [_method(name)() for name in names]
    variants = tuple(perf_model.Variant(p, a) for p in args.precision.split(",") for a in args.attention.split(","))
    for v in variants:
        if v.precision not in perf_model.PRECISION_DTYPES or v.attention not in perf_model.ATTENTION:
            raise UserError(
                f"unknown variant {v.precision}/{v.attention}: --precision takes 32 and/or bf16, "
                "--attention fused and/or explicit (comma-separated)"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    image_size = args.image_size or default_image_size(args.backbone)
    batch_size = args.batch_size or (64 if on_gpu else 8)
    task = _one_task(args.task)

    def decode_ips() -> float:
        rows = perf.data_perf(
            [task], data_root=data_root, image_size=image_size, batch_size=64, epochs=1, cache_dir=cache_dir
        )
        return rows[0]["decode_images_per_s"]

    say = (lambda s: None) if args.quiet else (lambda s: print(f"perf: {s}", file=sys.stderr, flush=True))
    report = perf_model.run(
        backbone_name=args.backbone,
        image_size=image_size,
        batch_size=batch_size,
        configs=configs,
        variants=variants,
        task=task,
        warmup=args.warmup,
        repeats=args.repeats,
        eval_batch_size=args.eval_batch_size or (256 if on_gpu else 4 * batch_size),
        eval_repeats=args.eval_repeats,
        compile=args.compile,
        sweep=args.sweep,
        decode_ips=decode_ips,
        device=device,
        progress=say,
    )
    json_path, md_path = perf_report.write_report(report, out)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(perf_report.markdown(report))
        print(f"written: {md_path} and {json_path.name}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="python -m benchmark", description="peft-bench: PEFT methods for ViTs on VTAB-1k.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    sub.add_parser("methods", help="list the registered methods, one per line").set_defaults(func=cmd_methods)
    sub.add_parser("tasks", help="the 19 VTAB-1k tasks as a table").set_defaults(func=cmd_tasks)

    p = sub.add_parser(
        "params",
        help="parameter counts per (method, task), without downloading weights",
        description="Builds each model on the meta device and reports tunable (method), head, "
        "backbone and nonzero_tunable parameters. Example: python -m benchmark params "
        "--backbone vit_base_patch16_224 --json",
    )
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--methods", help="comma-separated method names (default: all)")
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser(
        "synth",
        help="write synthetic tasks in the VTAB-1k folder layout",
        description="Example: python -m benchmark synth --out /tmp/synth --tasks cifar100,eurosat "
        "--per-class 8 --image-size 32",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tasks", default="all")
    p.add_argument("--per-class", type=positive_int, default=8, help="train images per class (val: a quarter)")
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    def data_and_results(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-root",
            default=DEFAULT_DATA_ROOT,
            metavar="DIR",
            help="VTAB-1k folder (one sub-folder per task; default: %(default)s)",
        )
        p.add_argument("--results", default="results/bench", metavar="DIR", help="default: %(default)s")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--save-tunable", action="store_true",
                       help="save each final run's tunable state beside its result (what `export` reads)")  # fmt: skip

    p = sub.add_parser(
        "run",
        help="one (method, task, seed, hyperparameters) -> one result JSON",
        description="Example: python -m benchmark run --method linear --task dtd --seed 42 "
        "--data-root ~/vtab-1k --lr 0.1",
    )
    p.add_argument("--method", required=True, help="a registered method (`python -m benchmark methods`)")
    p.add_argument("--task", required=True, help="a task id or alias (`python -m benchmark tasks`)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", metavar="FILE", help="result path (default: the results directory's layout)")
    data_and_results(p)
    _backbone_options(p)
    _training_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench",
        help="the sweep: every (task, seed), resumable, then the leaderboard",
        description="Example: python -m benchmark bench --method linear --tasks dtd,eurosat "
        "--data-root ~/vtab-1k --seeds 42,44 --results results/bench",
    )
    p.add_argument("--method", required=True, help="a registered method (`python -m benchmark methods`)")
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--seeds", type=int_list, default=[42, 44, 82, 100, 800], help="default: 42,44,82,100,800")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--run-progress", action="store_true", help="also show Lightning's per-run progress bar")
    data_and_results(p)
    _backbone_options(p)
    _training_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "pretrain-demo",
        help="pretrain the demo's tiny ViT on a procedural upstream task (CPU, about half a minute)",
        description="Trains peft_bench_demo_vit from scratch on procedurally generated images (name the "
        "background texture, the object's shape and its hue) and writes its weights as safetensors, with a "
        "JSON report beside them. Example: python -m benchmark pretrain-demo --out "
        "~/.cache/peft-bench/demo/peft_bench_demo_vit.safetensors",
    )
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument(
        "--images", type=positive_int, default=20_000, help="upstream training images (default: %(default)s)"
    )
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="pretrain again even if FILE exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain_demo)

    p = sub.add_parser(
        "leaderboard",
        help="regenerate the tables and plot from the result JSONs",
        description="Example: python -m benchmark leaderboard --results results/bench",
    )
    p.add_argument("--results", default="results/bench", metavar="DIR")
    p.add_argument(
        "--reported",
        nargs="?",
        const="methods",
        choices=("methods", "all"),
        help="also list the papers' reported rows (kind `reported`, with their source) and overlay them on the "
        "plot as hollow markers: those of the methods in the results, or `all`",
    )
    p.add_argument(
        "--reference", metavar="FILE", help="reference CSV (default: results/reference/vtab1k_reported.csv)"
    )
    p.set_defaults(func=cmd_leaderboard)

    def reference_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--source",
            action="append",
            metavar="TEXT",
            help="only reference rows whose source contains TEXT (case-insensitive; repeatable), e.g. "
            "'NOAH', 'V-PETL', 'PETL_Vision'",
        )
        p.add_argument(
            "--reference", metavar="FILE", help="reference CSV (default: results/reference/vtab1k_reported.csv)"
        )

    p = sub.add_parser(
        "compare",
        help="our results beside the papers' numbers: compare.md and compare.csv in the results directory",
        description="For each method with results and each of its reported rows: per task, group and average, "
        "our mean ± std over seeds, the reported number, the difference, whether it lies within our std over "
        "seeds, and the protocol and backbone of both sides (rows where they differ are marked). "
        "Example: python -m benchmark compare --results results/reproduce/vpt_deep-full --source V-PETL",
    )
    p.add_argument("--results", default="results/bench", metavar="DIR", help="default: %(default)s")
    p.add_argument("--method", help="comma-separated methods (default: every method with results)")
    p.add_argument("--table", metavar="PAPER", help="lay ours out as a paper's VTAB-1k table: e2vpt, convpass or vpt "
                   "(writes compare-PAPER.md and .csv)")  # fmt: skip
    reference_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "reproduce",
        help="a method's published VTAB-1k protocol (grid on val200, the paper's seeds), then compare",
        description="Runs the protocol that produced a method's reported numbers through `bench`: the spec's "
        "lr x weight-decay grid on train800 -> val200 (E2VPT: then its pruning search), then seeds "
        "42,44,82,100,800 on train800val200 -> test, last epoch (Convpass: its fixed recipe, no grid); then "
        "writes the leaderboard and compare.md/.csv. --budget quick runs one seed and a 2x1 grid, labelled as "
        "such everywhere. --plan prints the runs without training. "
        "Example: python -m benchmark reproduce --method vpt_deep --data-root ~/vtab-1k --plan",
    )
    p.add_argument("--method", required=True, help="a method with reported numbers")
    p.add_argument("--budget", choices=("full", "quick"), default="full", help="default: %(default)s")
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--plan", action="store_true", help="print the runs (grid, seeds, counts, images) and stop")
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="train this many epochs instead of the paper's (recorded; compare marks it)",
    )
    p.add_argument(
        "--data-root",
        default=DEFAULT_DATA_ROOT,
        metavar="DIR",
        help="VTAB-1k folder (one sub-folder per task; default: %(default)s)",
    )
    p.add_argument("--results", metavar="DIR", help="default: results/reproduce/<method>-<budget>")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--run-progress", action="store_true", help="also show Lightning's per-run progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    reference_options(p)
    _backbone_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "data",
        help="fetch, validate, install and cache the real VTAB-1k splits",
        description="Fetches the community VTAB-1k archive (vtab-1k.zip from the Hugging Face dataset repo "
        "XiN0919/VTAB-1k) or takes a local copy (--from), validates every requested task (the four split files, "
        "800/200/1000/test-size lines, labels in range, every image decoded), installs each under its canonical "
        "id in --out, prints a report, and decodes every split once into the uint8 image cache. A task that "
        "fails validation is reported and not installed (exit code 2). Running it again skips what is done. "
        "Example: python -m benchmark data --from ~/Downloads/vtab-1k.zip --tasks natural --image-size 224 --hf",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the task folders go; use it as --data-root (default: $VTAB_ROOT, else ~/.cache/peft-bench/vtab-1k)",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR|ARCHIVE",
        help="a downloaded vtab-1k.zip (or .tar, .tar.gz), or an unpacked folder (its files are hard-linked "
        "when on the same file system), instead of downloading from the Hugging Face Hub",
    )
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument(
        "--image-size", type=positive_int, default=224, help="side of the cached images (default: %(default)s)"
    )
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where decoded images are cached (default: $PEFT_BENCH_CACHE/arrays or ~/.cache/peft-bench/arrays)",
    )
    p.add_argument("--no-cache", action="store_true", help="only fetch, validate and install; build no image cache")
    p.add_argument(
        "--hf",
        action="store_true",
        help="also write each task as a Hugging Face datasets.DatasetDict (splits train800, val200, "
        "train800val200, test; features image=Image(), label=ClassLabel) under OUT/hf/<task>, loadable with "
        "datasets.load_from_disk; it holds a copy of the image bytes",
    )
    p.add_argument("--revision", help="revision of the Hub dataset repo to download (default: main)")
    p.add_argument("--workers", type=positive_int, help="decoding threads (default: up to 8, one per core)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "perf",
        help="speed and memory: every method's training step against the floor (--sweep, --data: see below)",
        description="Times each method's training step (the suite's own loss and optimiser, on a fixed "
        "synthetic batch; weights random, which speed does not depend on) side by side with the floor, the "
        "frozen backbone's forward + backward to its input tokens at the same token count, and with full "
        "fine-tuning; peak memory; evaluation throughput; the linear probe's cost over a task. Writes "
        "OUT/<device>-<backbone>-<date>.md and .json. --sweep adds the predicted wall time of each method's "
        "19-task VTAB-1k run against the official trainers' pattern. --data: images/s of the cached uint8 "
        "loader against decoding every image file each epoch. Examples: python -m benchmark perf --backbone "
        "vit_base_patch16_224 --batch-size 8 --methods vpt_deep,full ; python -m benchmark perf "
        "--precision 32,bf16 --attention explicit,fused --sweep ; python -m benchmark perf --data "
        "--data-root ~/vtab-1k --tasks dtd",
    )
    mode = p.add_argument_group("what to measure (default: the training step of every method)")
    mode = mode.add_mutually_exclusive_group()
    mode.add_argument(
        "--sweep", action="store_true", help="also predict each method's 19-task VTAB-1k run, ours vs official"
    )
    mode.add_argument("--data", action="store_true", help="data loading only: cached arrays vs decoding files")
    from benchmark.backbone import DEFAULT_BACKBONE

    g = p.add_argument_group("model options")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm ViT name (default: %(default)s)")
    g.add_argument("--image-size", type=positive_int, help="default: the backbone's (224 for --data)")
    g.add_argument("--batch-size", type=positive_int, help="default: 64 on a GPU, 8 on a CPU (64 for --data)")
    g.add_argument("--methods", default="all", help="comma-separated method names (default: all)")
    g.add_argument("--task", default="cifar100", help="whose per-task settings and classes (default: %(default)s)")
    g.add_argument("--precision", default="32", help="32, bf16 or both, comma-separated (default: %(default)s)")
    g.add_argument(
        "--attention",
        default="fused",
        help="fused (scaled_dot_product_attention), explicit, or both, comma-separated (default: %(default)s)",
    )
    g.add_argument("--warmup", type=positive_int, default=2, help="warm-up steps (default: %(default)s)")
    g.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=positive_int, help="default: 256 on a GPU, 4 × batch on a CPU")
    g.add_argument("--eval-repeats", type=positive_int, default=3, help="timed evaluation calls (default: 3)")
    g.add_argument("--compile", action="store_true", help="torch.compile the models and the floor")
    g.add_argument("--out", metavar="DIR", default="results/perf", help="default: %(default)s")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group("--data options (and the decode rate of --sweep)")
    g.add_argument(
        "--data-root", metavar="DIR", help="VTAB-1k folder (default: a synthetic task in a temporary folder)"
    )
    g.add_argument("--tasks", default="eurosat", help="comma-separated task ids (default: %(default)s)")
    g.add_argument("--split", choices=("train800", "val200", "train800val200", "test"), default="train800val200")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    g.add_argument("--epochs", type=positive_int, default=3, help="epochs of each loader (default: %(default)s)")
    g.add_argument(
        "--workers",
        type=_number(int, lambda v: v >= 0, "a non-negative integer"),
        default=0,
        help="DataLoader worker processes, both loaders (default: 0)",
    )
    g.add_argument("--cache-dir", metavar="DIR", help="image cache for --data-root (default: the usual one)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_perf)
    export.add_parser(sub)
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
