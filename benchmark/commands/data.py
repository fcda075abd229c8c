"""`data`: the real VTAB-1k splits, or FGVC's five datasets in VPT's layout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmark.commands.options import (
    DATA_ROOT_ENV,
    default_data_root,
    positive_int,
    suite_option,
    task_list,
)


def cmd_data(args: argparse.Namespace) -> int:
    from benchmark.data import vtab as vtab_data

    out, how = (args.out, "--out") if args.out else (None, "")
    if out is None and args.suite != "vtab1k":
        env = DATA_ROOT_ENV[args.suite]
        out, how = default_data_root(args.suite), f"${env}" if os.environ.get(env) else "$HOME"
    return vtab_data.run(
        task_list(args.tasks, args.suite),
        out=Path(out) if out else None,
        out_how=how,
        source=Path(args.source) if args.source else None,
        revision=args.revision,
        image_size=args.image_size,
        interpolation=args.interpolation,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        cache=not args.no_cache,
        hf=args.hf,
        workers=args.workers or 0,
    )


def register(sub: Any) -> None:
    """Add this module's commands to the `python -m benchmark` subparsers."""
    p = sub.add_parser(
        "data",
        help="fetch, validate, install and cache the real VTAB-1k splits (or validate and install FGVC)",
        description="Fetches the community VTAB-1k archive (vtab-1k.zip from the Hugging Face dataset repo "
        "XiN0919/VTAB-1k) or takes a local copy (--from), validates every requested task (the four split files, "
        "800/200/1000/test-size lines, labels in range, every image decoded), installs each under its canonical "
        "id in --out, prints a report, and decodes every split once into the uint8 image cache. A task that "
        "fails validation is reported and not installed (exit code 2). Running it again skips what is done. "
        "With --suite fgvc it takes the five FGVC datasets in VPT's layout (<dataset>/{train,val,test}.json "
        "and the images) from --from or from where they lie under --out, checks VPT's split sizes, class counts "
        "and every image, and says per dataset where to get what is missing; it never downloads images. "
        "Example: python -m benchmark data --from ~/Downloads/vtab-1k.zip --tasks natural --image-size 224 --hf; "
        "python -m benchmark data --suite fgvc --from ~/Downloads/fgvc",
    )
    suite_option(p)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the task folders go; use it as --data-root (default: $VTAB_ROOT, else "
        "~/.cache/peft-bench/vtab-1k; FGVC: $FGVC_ROOT, else ~/.cache/peft-bench/fgvc)",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR|ARCHIVE",
        help="a downloaded vtab-1k.zip (or .tar, .tar.gz), or an unpacked folder (its files are hard-linked "
        "when on the same file system), instead of downloading from the Hugging Face Hub; for FGVC, a folder "
        "or archive holding the dataset folders (CUB_200_2011, nabirds, OxfordFlower, StanfordDogs, StanfordCars)",
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
