"""`synth` and `pretrain-demo`: the synthetic tasks and the demo's backbone."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.commands.options import (
    positive_int,
    seed,
    suite_option,
    task_list,
)
from benchmark.core.errors import UserError

if TYPE_CHECKING:
    from tasks import Task

# Training images per class when --per-class is not given: FGVC's 1,173 classes keep theirs few.
DEFAULT_PER_CLASS = {"vtab1k": 8, "fgvc": 2}


def synth(args: argparse.Namespace) -> tuple[Path, list[Task]]:
    """`synth` of its parsed arguments: writes the tasks, returns the output folder and the tasks written."""
    from tasks.synth import SynthConfig, write_task
    from tasks.synth_fgvc import write_fgvc_task

    tasks = task_list(args.tasks, args.suite)
    write = write_fgvc_task if args.suite == "fgvc" else write_task
    per_class = args.per_class or DEFAULT_PER_CLASS[args.suite]
    try:
        config = SynthConfig(per_class=per_class, image_size=args.image_size, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(args.out).expanduser()
    from benchmark.run.results import check_writable

    check_writable(out, option="--out", what="output directory")
    for task in tasks:
        path = write(out, task, config)
        logging.getLogger("peft_bench").info("wrote %s", path)
    return out, tasks


def cmd_synth(args: argparse.Namespace) -> int:
    out, tasks = synth(args)
    print(f"{len(tasks)} synthetic task(s) in {out}")
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from benchmark.run.demo import pretrain
    from benchmark.run.results import check_writable

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


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "synth",
        help="write synthetic tasks in their suite's real layout (VTAB-1k's folders, FGVC's JSON splits)",
        description="Example: python -m benchmark synth --out /tmp/synth --tasks cifar100,eurosat "
        "--per-class 8 --image-size 32; python -m benchmark synth --suite fgvc --out /tmp/fgvc (the five FGVC "
        "datasets at their true class counts, non-square images of varied sizes)",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    suite_option(p)
    p.add_argument("--tasks", default="all")
    p.add_argument("--per-class", type=positive_int,
                   help="train images per class, test as many, val a quarter (default: 8 for vtab1k, 2 for fgvc)")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=cmd_synth)
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
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--force", action="store_true", help="pretrain again even if FILE exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain_demo)
