"""`export --merge`: the command line of `benchmark.run.export`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="a run's adapted model as a plain timm ViT checkpoint (--merge: the method folded into the weights)",
        description="Example: python -m benchmark export --merge results/bench/runs/peft_lora/dtd/final-s42.json "
        "(a run saved with --save-tunable); writes final-s42-merged.safetensors beside it",
    )
    p.add_argument("result", metavar="RESULT.json", help="a run's result file, saved with --save-tunable")
    p.add_argument("--merge", action="store_true", help="fold the method into the backbone's weights (required)")
    p.add_argument(
        "--out", metavar="FILE",
        help="default: <result>-merged.safetensors beside the result; never a file export reads (refused)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    # Imported here, as every command does its work's modules: the command line starts without torch and timm.
    from benchmark.run.export import export_merged
    from benchmark.run.results import check_writable

    if not args.merge:
        raise UserError("export writes merged checkpoints only; pass --merge")
    result = Path(args.result).expanduser()
    out = Path(args.out).expanduser() if args.out else result.with_name(f"{result.stem}-merged.safetensors")
    check_writable(out.parent, option="--out", what="output directory")
    info = export_merged(result, out)
    print(
        f"{info['method']} on {info['task']}: wrote {out} ({info['architecture']}, {info['parameters']:,} parameters "
        f"= backbone {info['backbone']:,} + head {info['head']:,}); merged logits differ from the adapted model's by "
        f"at most {info['max_logit_diff']:.1e}; load with timm.create_model({info['architecture']!r}, "
        f"num_classes={info['num_classes']}{info['size_arg']}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={info['num_classes']}))"
    )
    return 0
