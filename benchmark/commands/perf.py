"""`perf`: speed and memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmark.commands.options import (
    check_image_size,
    int_list,
    method_class,
    number_type,
    one_task,
    positive_int,
    task_list,
)
from benchmark.core.errors import UserError


def cmd_perf(args: argparse.Namespace) -> int:
    from benchmark.core.paths import check_cache_dir
    from benchmark.perf import loader

    if args.scaleout:
        return _scaleout(args)
    if args.slurm:
        return _slurm(args)

    data_root = Path(args.data_root).expanduser() if args.data_root else None
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else None
    check_cache_dir(cache_dir)
    if args.data:
        rows = loader.data_perf(
            data_tasks(args.tasks),
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
                print("data: synthetic tasks in a temporary folder (pass --data-root for real data)")
            print(loader.format_rows(rows))
        return 0
    return _model_perf(args, data_root, cache_dir)


def data_tasks(spec: str) -> list[Any]:
    """`--tasks` of `perf --data`: task ids of any suite (a VTAB-1k one and an FGVC one side by side), or `all` or a
    group of VTAB-1k."""
    from tasks import GROUPS, UnknownTaskError, get_task

    if spec.strip().lower() == "all" or spec.strip().lower() in GROUPS:
        return task_list(spec)
    try:
        tasks = [get_task(n) for n in spec.split(",") if n.strip()]
    except UnknownTaskError as e:
        raise UserError(str(e)) from None
    if not tasks:
        raise UserError("--tasks names no task; pass comma-separated task ids")
    return [t for i, t in enumerate(tasks) if t not in tasks[:i]]


def _scaleout(args: argparse.Namespace) -> int:
    from benchmark.perf.scaleout import markdown, measure
    from benchmark.run.results import check_writable

    if min(args.scaleout) < 1:
        raise UserError(f"--scaleout takes worker counts of at least 1, got {args.scaleout}")
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    check_writable(Path(args.out).expanduser(), option="--out", what="the perf tables")
    json_path, md_path = measure(args.scaleout, runs=args.runs, epochs=args.epochs, out=Path(args.out), say=say)
    print(markdown(json.loads(json_path.read_text())))
    print(f"written: {md_path} and {json_path.name}")
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from benchmark.perf.slurm import markdown, measure
    from benchmark.run.results import check_writable
    from benchmark.sweep.executors import check_slurm

    check_writable(Path(args.out).expanduser(), option="--out", what="the perf tables")
    check_slurm()
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    json_path, md_path = measure(runs=args.runs, epochs=args.epochs, out=Path(args.out), say=say)
    print(markdown(json.loads(json_path.read_text())))
    print(f"written: {md_path} and {json_path.name}")
    return 0


def default_config(cls: Any) -> Any:
    """A method's default config, or `Unbuilt` (its row then says why, in one line) when its defaults are refused:
    one broken method never ends a report of all of them."""
    from benchmark.perf.build import Unbuilt
    from benchmark.perf.timing import one_line

    try:
        return cls()
    except Exception as e:
        return Unbuilt(cls.name, f"its default config is refused: {one_line(e)}")


def _model_perf(args: argparse.Namespace, data_root: Path | None, cache_dir: Path | None) -> int:
    import torch

    from benchmark.perf import loader
    from benchmark.perf import model as perf_model
    from benchmark.perf import report as perf_report
    from benchmark.perf import timing as perf_timing
    from benchmark.run.backbone import default_image_size
    from benchmark.run.results import check_writable
    from methods import list_methods

    out = Path(args.out).expanduser()
    check_writable(out, option="--out", what="the perf tables")
    names = list_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = [default_config(method_class(name)) for name in names]
    variants = tuple(perf_timing.Variant(p, a) for p in args.precision.split(",") for a in args.attention.split(","))
    for v in variants:
        if v.precision not in perf_timing.PRECISION_DTYPES or v.attention not in perf_timing.ATTENTION:
            raise UserError(
                f"unknown variant {v.precision}/{v.attention}: --precision takes 32 and/or bf16, "
                "--attention fused and/or explicit (comma-separated)"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    image_size = args.image_size or default_image_size(args.backbone)
    check_image_size(args.backbone, image_size)
    batch_size = args.batch_size or (64 if on_gpu else 8)
    task = one_task(args.task)

    def decode_ips() -> float:
        rows = loader.data_perf(
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


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    from tasks.suites import SUITES

    p = sub.add_parser(
        "perf",
        help="speed and memory: every method's training step against the floor (--sweep, --data: see below)",
        description="Times each method's training step (the suite's own loss and optimiser, on a fixed "
        "synthetic batch; weights random, which speed does not depend on) side by side with the floor, the "
        "frozen backbone's forward + backward to its input tokens at the same token count, and with full "
        "fine-tuning; peak memory; evaluation throughput; each frozen-feature method's cost over a task (its head "
        "on cached features). Every method gets a row: one that cannot be timed says why in its note, and a method "
        "with a pruning or selection stage is timed as built, before the task's decision (noted). Writes "
        "OUT/<device>-<backbone>-<date>.md and .json. --sweep adds the predicted wall time of each method's "
        "19-task VTAB-1k run against the official trainers' pattern. --data: images/s of the cached uint8 "
        "loader against decoding every image file each epoch (a VTAB-1k task and an FGVC one, whose loader "
        "crops and flips at random per batch). Examples: python -m benchmark perf --backbone "
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
    mode.add_argument(
        "--scaleout",
        type=int_list,
        metavar="N,M,..",
        help="wall time of one synthetic sweep with N, M, .. local workers (one torch thread each), e.g. 1,2",
    )
    mode.add_argument(
        "--slurm",
        action="store_true",
        help="the SLURM driver's cost here: squeue calls per minute with 1 and 50 queued jobs, and the overhead "
        "per run with --runs-per-job 1 and 8 (a sweep of --runs tiny runs)",
    )
    from benchmark.run.backbone import DEFAULT_BACKBONE

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
        "--data-root",
        metavar="DIR",
        help="the tasks' suite folder, e.g. VTAB-1k's (default: synthetic tasks in a temporary folder)",
    )
    g.add_argument(
        "--tasks",
        default="eurosat,cub",
        help="comma-separated task ids of any suite: a VTAB-1k one and an FGVC one (random crop + flip per batch) "
        "side by side (default: %(default)s)",
    )
    g.add_argument(
        "--split",
        choices=tuple(dict.fromkeys(s for suite in SUITES.values() for s in suite.splits)),
        help="default: each task's final training split (train800val200, train)",
    )
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    g.add_argument("--epochs", type=positive_int, default=3, help="epochs of each loader (default: %(default)s)")
    g.add_argument(
        "--workers",
        type=number_type(int, lambda v: v >= 0, "a non-negative integer"),
        default=0,
        help="DataLoader worker processes, both loaders (default: 0)",
    )
    g.add_argument("--cache-dir", metavar="DIR", help="image cache for --data-root (default: the usual one)")
    g = p.add_argument_group("--scaleout and --slurm options (--epochs: of each run)")
    g.add_argument("--runs", type=positive_int, default=8, help="runs in the sweep (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_perf)
