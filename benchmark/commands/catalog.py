"""`methods`, `tasks`, `backbones` and `params`: what the suite has."""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

from benchmark.commands.options import (
    check_image_size,
    method_class,
    method_options,
    positive_int,
    suite_option,
    task_list,
)
from benchmark.core.errors import UserError


def cmd_methods(args: argparse.Namespace) -> int:
    import methods

    for name in methods.list_methods():
        origin = methods.method_origin(name)
        print(name if origin is None else f"{name}  (plugin: {origin})")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks import get_suite, list_tasks

    suite = get_suite(args.suite)
    rows = []
    for t in list_tasks(suite=suite.id):
        row: dict[str, Any] = {"task": t.id}
        if len(suite.groups) > 1:
            row["group"] = t.group
        else:
            row["dataset"] = t.title
        row |= {"classes": t.num_classes, **{s: t.split_sizes[s] for s in suite.splits}, "folder": t.folder}
        if suite.layout == "json":
            row["images in"] = f"{t.folder}/{t.image_root}".rstrip("/") + "/"
        rows.append(row | {"aliases": ", ".join(t.aliases)})
    print(
        f"{suite.title}: {len(rows)} tasks; tune on {' -> '.join(suite.tune)}, final runs on {' -> '.join(suite.final)}"
    )
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from benchmark.run.presets import preset_rows

    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['family']}, reference id {row['reference']}): {row['title']}")
        for key in ("weights", "normalization", "pooling", "papers"):
            print(f"  {key + ':':15}{row[key]}")
    print("Any other timm ViT or Swin runs as timm builds it (e.g. --backbone vit_base_patch16_224, test_vit).")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from benchmark.run.backbone import meta_backbone
    from benchmark.run.resolve import resolve_config

    names = args.methods.split(",") if args.methods else None
    import methods

    configs = [method_class(n.strip()) for n in (names or methods.list_methods())]
    options = method_options(args)
    tasks = task_list(args.tasks, args.suite)
    if args.image_size:
        check_image_size(args.backbone, args.image_size)
    out = []
    for cls in configs:
        for task in tasks:
            config = resolve_config(cls, task.id, options)
            # The meta device gives every tensor its shape without allocating or initialising it.
            backbone = meta_backbone(args.backbone, args.image_size, **config.backbone_kwargs())
            try:
                model = config.build(copy.deepcopy(backbone), task.num_classes)
            except ValueError as e:
                raise UserError(f"{cls.name} on {task.id}: {e}") from None
            out.append({"method": cls.name, "task": task.id, **model.param_report().as_dict()})
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        import pandas as pd

        print(pd.DataFrame(out).to_string(index=False))
    return 0


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    sub.add_parser(
        "methods", help="list the registered methods, one per line (a plugin's with its distribution)"
    ).set_defaults(func=cmd_methods)
    p = sub.add_parser(
        "tasks",
        help="a suite's tasks as a table (classes, split sizes, folders)",
        description="Example: python -m benchmark tasks --suite fgvc",
    )
    suite_option(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser(
        "backbones",
        help="the papers' backbones (presets): family, weights, normalisation, pooling, papers, reference id",
        description="Example: python -m benchmark backbones",
    )
    p.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser(
        "params",
        help="parameter counts per (method, task), without downloading weights",
        description="Builds each model on the meta device and reports tunable (method), head, "
        "backbone and nonzero_tunable parameters. Example: python -m benchmark params "
        "--backbone swin_base_patch4_window7_224 --method vpt_deep --set num_tokens=10",
    )
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--methods", "--method", help="comma-separated method names (default: all)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
        help="a method option for every run, e.g. --set num_tokens=10 (repeatable; wins over per-task values)",
    )  # fmt: skip
    suite_option(p)
    p.add_argument("--tasks", default="all", help="all, a group, or comma-separated task ids (default: all)")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.set_defaults(func=cmd_params)
