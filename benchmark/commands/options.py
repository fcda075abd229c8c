"""What the commands share: one-line argparse errors, argument types, method and task lookups, and the
option groups of the training commands (backbone and preprocessing, training, data and results, reference
rows)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from benchmark.core.errors import UserError
from benchmark.sweep.launch import LAUNCHERS
from tasks import DEFAULT_SUITE, SUITES, UnknownTaskError, get_suite, parse_tasks

# Where each suite's data lives unless --data-root says otherwise: $<SUITE>_ROOT, else under ~/.cache/peft-bench.
DATA_ROOT_ENV = {"vtab1k": "VTAB_ROOT", "fgvc": "FGVC_ROOT"}
DATA_ROOT_DIRS = {"vtab1k": "vtab-1k", "fgvc": "fgvc"}
DEFAULT_DATA_ROOT = os.environ.get("VTAB_ROOT") or "~/.cache/peft-bench/vtab-1k"


def default_data_root(suite: str) -> str:
    """The data folder of `suite` when no --data-root is given: $VTAB_ROOT / $FGVC_ROOT, else the cache's."""
    return os.environ.get(DATA_ROOT_ENV[suite]) or f"~/.cache/peft-bench/{DATA_ROOT_DIRS[suite]}"


def resolve_data_root(args: argparse.Namespace) -> Path:
    """The data folder a command reads: --data-root, else the suite's default."""
    return Path(args.data_root or default_data_root(args.suite)).expanduser()


def suite_option(p: argparse.ArgumentParser, default: str | None = DEFAULT_SUITE, help: str | None = None) -> None:
    """`--suite`: which suite `--tasks` names tasks of (a report's: which suite's results; None: every suite's)."""
    p.add_argument("--suite", choices=tuple(SUITES), default=default,
                   help=help or "the suite the tasks belong to (default: %(default)s)")  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong, and where the help is."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def number_type(cast: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], Any]:
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


positive_int = number_type(int, lambda v: v > 0, "a positive integer")
# More epochs than any published recipe by two orders of magnitude is a typo, not a plan.
MAX_EPOCHS = 10_000
epochs = number_type(int, lambda v: 0 < v <= MAX_EPOCHS, f"an integer from 1 to {MAX_EPOCHS}")
positive_float = number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = number_type(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return list(dict.fromkeys(values))


# Seeds go to `seed_everything`, which takes 0 .. 2**32 - 1 (numpy's range).
MAX_SEED = 2**32 - 1
seed = number_type(int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def seed_list(text: str) -> list[int]:
    """Comma-separated seeds, each in `seed`'s range, duplicates dropped."""
    values = int_list(text)
    bad = [v for v in values if not 0 <= v <= MAX_SEED]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be integers from 0 to {MAX_SEED}, got {bad[0]}")
    return values


def float_list(parse: Callable[[str], float]) -> Callable[[str], tuple[float, ...]]:
    def parse_list(text: str) -> tuple[float, ...]:
        return tuple(parse(x) for x in text.split(",") if x.strip())

    return parse_list


def method_class(name: str):
    import methods

    try:
        return methods.get_method(name)
    except methods.UnknownMethodError as e:
        raise UserError(str(e)) from None


def task_list(spec: str, suite: str = DEFAULT_SUITE):
    try:
        return parse_tasks(spec, suite)
    except UnknownTaskError as e:
        raise UserError(str(e)) from None


# -- shared option groups ---------------------------------------------------------------------------------
def one_task(spec: str, several: str = "pick one", suite: str = DEFAULT_SUITE) -> Any:
    tasks = task_list(spec, suite)
    if len(tasks) != 1:
        raise UserError(f"{spec!r} names {len(tasks)} tasks, this command takes one; {several}")
    return tasks[0]


def backbone_options(p: argparse.ArgumentParser) -> None:
    from benchmark.run.backbone import DEFAULT_BACKBONE, NORMALIZATIONS
    from benchmark.run.loggers import LOGGERS

    g = p.add_argument_group("backbone and preprocessing")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm ViT name (default: %(default)s)")
    g.add_argument("--no-pretrained", action="store_true", help="random weights instead of the pretrained ones")
    g.add_argument("--weights", metavar="FILE", help="local checkpoint (.safetensors, .pth, or Google's .npz)")
    g.add_argument("--image-size", type=positive_int, help="input side in pixels (default: the backbone's)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"),
                   help="the resize filter (default: the suite's: bicubic for vtab1k, bilinear for fgvc as VPT's "
                   "transforms)")  # fmt: skip
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
    p.add_argument_group("training curves").add_argument(
        "--logger",
        choices=LOGGERS,
        default="csv",
        help="where each run's per-epoch metrics go, in <result>.logs/ beside its result file: csv (metrics.csv), "
        "tensorboard (event files), wandb (an offline run unless $WANDB_MODE says otherwise), none "
        "(default: %(default)s; recorded, but no part of a run's identity: a sweep resumes under another)",
    )


def training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the method's recipe)")
    g.add_argument(
        "--protocol",
        choices=("final", "tune", "grid"),
        default="final",
        help="final: train on the suite's final split, report test (VTAB-1k: train800val200 -> test, FGVC: train -> "
        "test); tune: train800 -> val200 (FGVC: train -> val); grid: tune the recipe's lr x wd grid on the "
        "validation split, then final with the best pair (default: %(default)s)",
    )
    g.add_argument("--epochs", type=epochs)
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


def run_settings(args: argparse.Namespace):
    from benchmark.run.backbone import default_image_size
    from benchmark.run.loggers import check_logger
    from benchmark.run.runner import Settings

    check_logger(args.logger)  # a missing package stops the command before any training
    image_size = args.image_size or default_image_size(args.backbone)
    check_image_size(args.backbone, image_size)
    return Settings(
        backbone=args.backbone,
        pretrained=not args.no_pretrained,
        weights=str(Path(args.weights).expanduser().resolve()) if args.weights else None,
        image_size=image_size,
        interpolation=args.interpolation or get_suite(args.suite).interpolation,
        normalization=args.normalization,
        precision=args.precision,
        cache_features=not args.no_feature_cache,
        eval_batch_size=args.eval_batch_size,
        compile=args.compile,
        data_on_device=args.data_on_device,
        logger=args.logger,
    )


def method_options(args: argparse.Namespace) -> dict[str, str]:
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
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


def data_and_results(p: argparse.ArgumentParser) -> None:
    suite_option(p)
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="the suite's data folder, one sub-folder per task (default: $VTAB_ROOT or ~/.cache/peft-bench/vtab-1k "
        "for vtab1k, $FGVC_ROOT or ~/.cache/peft-bench/fgvc for fgvc)",
    )
    p.add_argument("--results", default="results/bench", metavar="DIR", help="default: %(default)s")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--save-tunable", action="store_true",
                   help="save each final run's tunable state beside its result (what `export` reads)")  # fmt: skip


def reference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        action="append",
        metavar="TEXT",
        help="only reference rows whose source contains TEXT (case-insensitive; repeatable), e.g. "
        "'NOAH', 'V-PETL', 'PETL_Vision'",
    )
    p.add_argument(
        "--reference",
        metavar="FILE",
        help="reference CSV of one suite (default: results/reference/vtab1k_reported.csv and fgvc_reported.csv)",
    )


def method_names(text: str | None) -> list[str] | None:
    """`--method a,b`: registered method names (an unknown one is an error), or None for all."""
    if not text:
        return None
    return list(dict.fromkeys(method_class(n.strip()).name for n in text.split(",") if n.strip()))


def check_image_size(backbone: str, image_size: int) -> None:
    """The image side must be a whole number of patches (at least one), and on Swin fit its windows: else every run
    would fail later, or timm would pad the feature maps (zero tokens inside windows) where the official Swin
    refuses the size."""
    from benchmark.run.backbone import meta_backbone, swin_size_fits, swin_windows
    from methods import family

    model = meta_backbone(backbone)
    patch = model.patch_embed.patch_size
    p = patch[0] if isinstance(patch, tuple | list) else int(patch)
    if family(model) == "swin":
        windows = swin_windows(model)
        if not swin_size_fits(image_size, p, windows):
            fits = min(
                (s for s in range(p, 4 * max(image_size, p) + 1, p) if swin_size_fits(s, p, windows)),
                key=lambda s: (abs(s - image_size), s),
                default=None,
            )
            raise UserError(
                f"--image-size {image_size} does not fit {backbone}: with {p} px patches, each stage's grid (the side "
                f"/ {p}, halved by each of the {len(windows) - 1} patch merges) must be whole and a multiple of its "
                f"window ({', '.join(map(str, windows))}) or no larger than it"
                + (f"; use e.g. {fits}" if fits else "")
            )
        return
    if image_size < p or image_size % p:
        fits = max(p, image_size // p * p)
        raise UserError(f"--image-size {image_size} is not a multiple of {backbone}'s patch size {p}; use e.g. {fits}")


def launcher_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the runs execute (see README: Many GPUs and clusters)")
    g.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="inline",
        help="inline: one after another in this process (default); local: worker processes on this machine, "
        "one per GPU; slurm: SLURM job arrays. Both through submitit; runs are claimed, so a sweep resumes "
        "and two drivers never run a run twice",
    )
    g.add_argument("--workers", type=positive_int, help="local workers (default: one per visible GPU, 1 on a CPU)")
    g.add_argument("--runs-per-gpu", type=positive_int, help="local workers packed on each GPU (default: 1)")
    g.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads per worker, or of this process inline (default: CPUs / workers; inline: torch's)",
    )
    g.add_argument("--slurm-partition", metavar="NAME", help="partition (default: the cluster's)")
    g.add_argument(
        "--slurm-time",
        metavar="MIN|H:MM:SS",
        help="time limit of one job (default: 4:00:00 per run each of its workers holds)",
    )
    g.add_argument(
        "--slurm-gpus-per-job",
        dest="slurm_gpus",
        type=int,
        metavar="N",
        help="GPUs per job (default: 1; 0 on a CPU). N > 1 is node mode: the job runs one worker per GPU, "
        "sharing its --runs-per-job runs; e.g. 8 with --runs-per-job 64 on 8-GPU nodes",
    )
    g.add_argument(
        "--slurm-cpus-per-job",
        dest="slurm_cpus",
        type=positive_int,
        metavar="N",
        help="CPUs per job, shared evenly by its workers (default: 8 per GPU)",
    )
    g.add_argument("--slurm-mem-gb", type=positive_int, metavar="GB", help="memory per job (default: the cluster's)")
    g.add_argument(
        "--runs-per-job",
        type=positive_int,
        metavar="K",
        help="runs packed into one SLURM job, so start-up, weights and data are paid once per K runs "
        "(default: one per worker)",
    )
    g.add_argument(
        "--slurm-array-parallelism",
        type=positive_int,
        metavar="N",
        help="this sweep's jobs queued or running at once, all job arrays together (default: 256); the "
        "driver submits more as they end",
    )
    g.add_argument(
        "--slurm-extra",
        action="append",
        metavar="KEY=VALUE",
        help="another #SBATCH directive, e.g. --slurm-extra account=abc --slurm-extra qos=high (repeatable)",
    )
