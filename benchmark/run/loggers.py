"""A run's training curves through Lightning's logger, in a folder beside its result file.

For the result `<stem>.json`, `--logger csv` (the default) writes `<stem>.logs/metrics.csv` and `hparams.yaml`;
`tensorboard` writes event files there; `wandb` an offline run there (unless $WANDB_MODE says otherwise); `none`
writes nothing. A run that executes again (a failed run retried, a killed one taken over) replaces the logs of its
result path. What is logged is no part of a run's identity (`runner.NOT_IDENTITY`): a sweep resumed with another
logger reuses its finished runs.

Lightning is imported only where a logger is built: the command line's parsers read `LOGGERS`, and Lightning takes
seconds to import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.core.errors import UserError

LOGGERS = ("csv", "tensorboard", "wandb", "none")
# What a logger needs beyond the suite's dependencies (any one of the modules), and the extra that installs it.
NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}
# Lightning's default interval of step values, shortened to one epoch on small tasks so that every epoch has one
# (each logged step reads the loss back from the device).
STEP_INTERVAL = 50


def log_dir(result: Path) -> Path:
    """The folder of the logs of the run whose result is `result`: `<stem>.logs` beside it."""
    return Path(result).with_name(f"{Path(result).stem}.logs")


def check_logger(name: str) -> None:
    """`UserError` when `name` is no logger, or its package is not installed (one line: what, and how to get it)."""
    if name not in LOGGERS:
        raise UserError(f"unknown logger {name!r}; pick one of {', '.join(LOGGERS)}")
    modules, extra = NEEDS.get(name, ((), ""))
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise UserError(
            f"--logger {name} needs the {modules[0]} package, which is not installed; "
            f"pip install 'peft-bench[{extra}]'"
        )


@dataclass
class RunLogging:
    """The Trainer's logging arguments for one run."""

    logger: Any = False  # a Lightning logger, or False for none
    callbacks: list[Any] = field(default_factory=list)
    log_every_n_steps: int = STEP_INTERVAL


@contextmanager
def run_logging(
    name: str, result: Path | None, *, hparams: dict[str, Any], steps_per_epoch: int
) -> Iterator[RunLogging]:
    """The logger `name` for the run whose result goes to `result`, with the learning-rate monitor and an interval
    of step values; no logger under `none` or without a result path (nothing to write beside). The earlier logs of
    the result path are removed first. `hparams` (the run's recorded config) are logged with the curves."""
    if result is not None and log_dir(result).is_dir():
        shutil.rmtree(log_dir(result))
    if name == "none" or result is None:
        yield RunLogging()
        return
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    # Every run is one single-device process, but Lightning's loggers write only where `rank_zero_only.rank` is 0,
    # which it reads from SLURM_PROCID & co. at import: in a SLURM job's second task (node mode) nothing would land.
    rank_zero_only.rank = 0

    folder = log_dir(result)
    folder.mkdir(parents=True, exist_ok=True)  # wandb falls back to a temporary folder when its folder is missing
    logger = make_logger(name, folder, f"{hparams.get('method')}-{hparams.get('task')}-{Path(result).stem}")
    try:
        logger.log_hyperparams(json.loads(json.dumps(hparams)))  # JSON's types: tuples would be python tags in YAML
        yield RunLogging(
            logger, [LearningRateMonitor(logging_interval="epoch")], max(1, min(STEP_INTERVAL, steps_per_epoch))
        )
    except BaseException as e:
        # A signal stops the run unrecorded (`core.errors.Interrupted`, Ctrl-C): its partial curves go with it, so
        # a stopped sweep leaves nothing half-written. A failing run (an Exception) keeps them beside its record.
        if not isinstance(e, Exception):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if name == "wandb":  # else the next run of a sweep would log into this one's wandb run
            import wandb

            wandb.finish()


def make_logger(name: str, folder: Path, run_name: str) -> Any:
    """Lightning's `name` logger writing into `folder` itself (no `version_N` sub-folder)."""
    check_logger(name)
    from pytorch_lightning import loggers

    if name == "csv":
        return loggers.CSVLogger(folder, name="", version="")
    if name == "tensorboard":
        return loggers.TensorBoardLogger(folder, name="", version="", default_hp_metric=False)
    # Offline unless the user chose a mode: Lightning's `offline=True` would override their $WANDB_MODE.
    return loggers.WandbLogger(
        name=run_name,
        save_dir=folder,
        project=os.environ.get("WANDB_PROJECT") or "peft-bench",
        mode=os.environ.get("WANDB_MODE") or "offline",
        settings={"quiet": True},  # no run summary after each run of a sweep
    )
