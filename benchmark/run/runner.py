"""One run: (method, task, seed, hyperparameters) -> one result record. The sweep over many is `benchmark.sweep.inline`.

Protocols (the split protocol is code, never a convention; which split plays which role is the task's
suite's, `benchmark.run.splits`: VTAB-1k tunes train800 -> val200 and finals train800val200 -> test, FGVC
train -> val and train -> test):

- `final`: train on the final training split, report test accuracy after the last epoch.
- `tune`: train on the tuning split, report validation accuracy after the last epoch.
- `grid`: every (lr, weight decay) pair of the recipe's grid in `tune` mode with the tuning seed;
  the best last-epoch validation accuracy wins (ties: smaller lr, then smaller weight decay); then
  `final` for each seed with the chosen pair, which every final result records.

No code path evaluates the test split before training has ended, or selects anything by it.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from benchmark.core.device import compute_device, sync
from benchmark.core.errors import UserError
from benchmark.core.platform import peak_rss_mib
from benchmark.data.arrays import SplitArrays, VTABDataModule, normalize
from benchmark.data.cache import preprocessing, resize_side
from benchmark.run.backbone import NORMALIZATIONS, meta_backbone
from benchmark.run.loggers import LOGGERS, run_logging
from benchmark.run.module import ClassificationModule
from benchmark.run.results import SCHEMA_VERSION, provenance
from benchmark.run.splits import SweepData, mode_splits
from benchmark.run.splits import prepare_data as prepare_data  # where callers of one run find it
from methods import MethodConfig, PeftModel
from tasks import Task
from tasks.atomic import DISK_FULL

log = logging.getLogger("peft_bench")
# Each run is one single-device process (see the Trainer's plugins): Lightning's hint to launch it through
# srun, given wherever srun exists, does not apply.
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")

PROTOCOLS = ("final", "tune", "grid")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}
DATA_ON_DEVICE = ("auto", "on", "off")
# Settings that change a run's speed, not its outcome: recorded, but not compared when resuming.
SPEED_ONLY = ("eval_batch_size", "compile", "data_on_device")
# Settings recorded with each result that are no part of its identity: how fast it ran, and what was logged of it.
NOT_IDENTITY = (*SPEED_ONLY, "logger")
TUNING_SEED = 42
# How much of a paper's protocol a `reproduce` sweep runs (`full`: all of it; `quick`: reduced, labelled).
BUDGETS = ("full", "quick")


@dataclass(frozen=True)
class Settings:
    """What every run of a sweep shares besides the method: backbone, preprocessing, numerics.

    Attributes:
        backbone: timm model name.
        pretrained: whether pretrained weights were loaded (from `weights` or the Hub).
        weights: local checkpoint path, if any.
        image_size: input side in pixels: images are resized straight to it (suites without augmentation), or
            cropped to it after their shorter side is resized to image_size / 0.875 (`crop_flip` suites).
        interpolation: `bicubic` or `bilinear`.
        normalization: a key of `NORMALIZATIONS`.
        precision: `32` or `bf16` (autocast).
        cache_features: train frozen-feature methods (the linear probe) on features computed once.
        eval_batch_size: batch size of evaluation and feature extraction.
        compile: run the model through `torch.compile`.
        data_on_device: `auto` keeps a task's uint8 images on the GPU when they fit in a quarter of its
            free memory (batches are then gathered there: no host-to-device copy per step); `on` always
            (also on a CPU, where it only changes how batches are gathered); `off` never.
        logger: where the per-epoch metrics go besides the result (`benchmark.run.loggers`): `csv`,
            `tensorboard`, `wandb` or `none`.

    `eval_batch_size`, `compile` and `data_on_device` change how fast a run goes, not what it computes,
    so they are recorded with each result but are not part of its identity (`SPEED_ONLY`); nor is `logger`,
    which changes what is logged, not what is computed (`NOT_IDENTITY`).

    `budget`: `full`, or `quick` for a reduced reproduction (`reproduce --budget quick`); part of every
    run's identity, so runs planned under different budgets never stand in for one another.
    """

    backbone: str
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 224
    interpolation: str = "bicubic"
    normalization: str = "imagenet"
    precision: str = "32"
    cache_features: bool = True
    eval_batch_size: int = 256
    compile: bool = False
    data_on_device: str = "auto"
    budget: str = "full"
    logger: str = "csv"

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise UserError(f"unknown budget {self.budget!r}; pick one of {', '.join(BUDGETS)}")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {self.normalization!r}; pick one of {', '.join(NORMALIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; pick one of {', '.join(PRECISIONS)}")
        if self.data_on_device not in DATA_ON_DEVICE:
            raise UserError(f"unknown data_on_device {self.data_on_device!r}; pick one of {', '.join(DATA_ON_DEVICE)}")
        if self.logger not in LOGGERS:
            raise UserError(f"unknown logger {self.logger!r}; pick one of {', '.join(LOGGERS)}")


@dataclass
class RunSpec:
    """One run: a method config (already resolved for the task), a task, a seed, a mode and a protocol."""

    config: MethodConfig
    task: Task
    seed: int
    mode: str
    protocol: str
    settings: Settings
    selection: dict[str, Any] | None = None
    # A pruning stage's outcome to apply after building (see `PeftModel.apply_pruning`), and what to record.
    prune_state: dict[str, Tensor] | None = None
    pruning: dict[str, Any] | None = None
    # Where to save the trained tunable state (`<stem>.safetensors`) and the initial one (`<stem>-init...`).
    save_state: Path | None = None
    # The hashes of the decision files this run depends on (`benchmark.sweep.decisions`), by kind.
    decisions: dict[str, str] | None = None

    def config_dict(self) -> dict[str, Any]:
        """Everything that determines the run's outcome; two runs with equal dicts are the same run."""
        out = {
            "method": self.config.name,
            "method_version": self.config.version,  # its training semantics (`MethodConfig.version`)
            "task": self.task.id,
            "seed": self.seed,
            "protocol": self.protocol,
            "mode": self.mode,
            "method_config": self.config.to_dict(),
            **asdict(self.settings),
        }
        del out["logger"]  # recorded (`new_record`), but no part of the identity, which decisions also hash
        if out["budget"] == "full":
            del out["budget"]  # the default: results written before budgets existed keep their identity
        if self.selection is not None:
            out["selection"] = {k: self.selection[k] for k in ("lr", "weight_decay")}
        if self.pruning is not None:
            out["pruning"] = {k: self.pruning[k] for k in ("stage", "candidate") if k in self.pruning}
        if self.decisions:
            out["decisions"] = dict(self.decisions)
        if (augment := self.task.suite_info.augment) != "none":  # absent for VTAB-1k: its identities stay
            out["preprocessing"] = {"augment": augment, "resize": resize_side(self.settings.image_size)}
        return out


def quiet_lightning() -> None:
    """Keep Lightning's per-run banners out of a sweep's output (its progress bar stays available)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*Trainer.fit.*stopped: `max_epochs=.*")
    # Methods that keep the frozen backbone in eval mode on purpose (VPT on Swin, as its official code does).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class _TrainTimer(pl.Callback):
    """Wall time of the training epochs only (no set-up, no evaluation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(module.device)
        self.seconds += time.perf_counter() - self._start


@torch.inference_mode()
def extract_features(model: PeftModel, arrays: SplitArrays, settings: Settings) -> SplitArrays:
    """Pooled features of `model.forward_features` for a whole split (eval mode), as float32 arrays."""
    device = compute_device()
    mean, std = (torch.tensor(v, device=device) for v in NORMALIZATIONS[settings.normalization])
    was_training = model.training
    model.eval().to(device)
    chunks = []
    for i in range(0, len(arrays), settings.eval_batch_size):
        x = torch.from_numpy(np.array(arrays.inputs[i : i + settings.eval_batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
            chunks.append(model.forward_features(normalize(x, mean, std)).float().cpu())
    model.train(was_training)
    return SplitArrays(arrays.name, torch.cat(chunks).numpy(), arrays.labels, arrays.sha256)


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    return peak_rss_mib(), "process peak RSS"


def check_config(config: MethodConfig, settings: Settings, where: str = "") -> None:
    """The method's structural checks (`MethodConfig.check_backbone`) against the backbone's structure, built on
    the meta device in milliseconds: a config that cannot be built stops the command before any work."""
    meta = meta_backbone(settings.backbone, settings.image_size, **config.backbone_kwargs())
    try:
        config.check_family(meta)
        config.check_backbone(meta)
    except ValueError as e:
        raise UserError(f"{config.name}{where}: {e}") from None


def _disk_full(e: BaseException) -> bool:
    """A full disk, as an `OSError` or as a library's own error (safetensors names it only in its message)."""
    return (isinstance(e, OSError) and e.errno in DISK_FULL) or "No space left on device" in str(e)


def new_record(spec: RunSpec, data: SweepData) -> dict[str, Any]:
    """A run's record before it runs: what it is and what it trains on, `status: failed` until it succeeds."""
    train_split, eval_split = mode_splits(spec.task, spec.mode)
    arrays, files = data.arrays[spec.task.id], data.tasks[spec.task.id].splits
    size, interpolation = spec.settings.image_size, spec.settings.interpolation
    return {
        "schema": SCHEMA_VERSION,
        "method": spec.config.name,
        "task": spec.task.id,
        "group": spec.task.group,
        "seed": spec.seed,
        "protocol": spec.protocol,
        "mode": spec.mode,
        "status": "failed",
        "error": None,
        "test_acc": None,
        "val_acc": None,
        "params": None,
        "train_loss": [],
        "config": {**spec.config_dict(), "logger": spec.settings.logger},
        "selection": spec.selection,
        "pruning": spec.pruning,
        "feature_extraction_s": None,
        "data": {
            "root": str(data.tasks[spec.task.id].dir.parent),
            "train_split": {
                "name": train_split,
                "size": len(arrays[train_split]),
                "sha256": arrays[train_split].sha256,
            },
            "eval_split": {"name": eval_split, "size": len(arrays[eval_split]), "sha256": arrays[eval_split].sha256},
            # What the images went through before the model saw them (descriptive: identity is `config`).
            "preprocessing": {
                "train": preprocessing(files[train_split], size, interpolation),
                "eval": preprocessing(files[eval_split], size, interpolation),
            },
        },
    }


def execute(spec: RunSpec, backbone: VisionTransformer, data: SweepData, *, progress: bool = False,
            result: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate one run; return its result record. Failures become `status: failed` records.

    `result`: where the record will be written; its per-epoch metrics go beside it (`benchmark.run.loggers`)."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    train_split, eval_split = mode_splits(spec.task, spec.mode)
    arrays = data.arrays[spec.task.id]
    record = new_record(spec, data)
    module = None
    try:
        pl.seed_everything(spec.seed, workers=True, verbose=False)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model = spec.config.build(copy.deepcopy(backbone), spec.task.num_classes)
        if spec.prune_state is not None:
            model.apply_pruning(spec.prune_state)
        if spec.settings.compile:
            model.compile()  # in place: forward goes through torch.compile; the state dict keeps its keys
        if spec.save_state is not None and spec.pruning is not None:  # a pruning stage rewinds to these values
            spec.save_state.parent.mkdir(parents=True, exist_ok=True)
            model.save_tunable(spec.save_state.with_name(spec.save_state.name + "-init.safetensors"))
        record["params"] = model.param_report().as_dict()
        train, evaluate = arrays[train_split], arrays[eval_split]
        inputs = "images"
        # The features do not depend on the seed or the head, so a sweep computes them once per split; not
        # under random crops, which a feature computed once would freeze.
        if model.features_frozen and spec.settings.cache_features and train.index is None:
            t_features = time.perf_counter()
            for split in (train_split, eval_split):
                key = (spec.task.id, split)
                if key not in data.features:
                    data.features[key] = extract_features(model, arrays[split], spec.settings)
            record["feature_extraction_s"] = time.perf_counter() - t_features
            train, evaluate = data.features[(spec.task.id, train_split)], data.features[(spec.task.id, eval_split)]
            inputs = "features"
        recipe = spec.config.recipe
        mean, std = NORMALIZATIONS[spec.settings.normalization]
        module = ClassificationModule(
            model, num_classes=spec.task.num_classes, recipe=recipe, inputs=inputs, eval_split=eval_split
        )
        datamodule = VTABDataModule(
            train,
            evaluate,
            batch_size=recipe.batch_size,
            eval_batch_size=spec.settings.eval_batch_size,
            drop_last=recipe.drop_last,
            seed=spec.seed,
            mean=mean,
            std=std,
            on_device=spec.settings.data_on_device if inputs == "images" else "off",
        )
        timer = _TrainTimer()
        steps = len(train) // recipe.batch_size  # full batches per epoch
        with run_logging(spec.settings.logger, result, hparams=record["config"], steps_per_epoch=steps) as logs:
            trainer = pl.Trainer(
                max_epochs=recipe.epochs,
                accelerator="auto",
                devices=1,
                precision=PRECISIONS[spec.settings.precision],
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
                num_sanity_val_steps=0,
                inference_mode=True,  # evaluation under torch.inference_mode
                plugins=[LightningEnvironment()],  # one single-device process: never SLURM's, even inside a job
                logger=logs.logger,
                log_every_n_steps=logs.log_every_n_steps,
                callbacks=[*logs.callbacks, timer],  # the timer last: its epoch starts after the others' work
            )
            trainer.fit(module, datamodule=datamodule)
            trainer.test(module, datamodule=datamodule, verbose=False)
        record["test_acc" if eval_split == "test" else "val_acc"] = module.eval_accuracy
        if spec.save_state is not None:
            spec.save_state.parent.mkdir(parents=True, exist_ok=True)
            model.save_tunable(spec.save_state.with_name(spec.save_state.name + ".safetensors"))
            record["tunable_state"] = spec.save_state.name + ".safetensors"  # beside the result file
        record["train_loss"] = module.epoch_losses
        if module.diagnostics["train"] or module.diagnostics["eval"]:
            record["diagnostics"] = module.diagnostics
        record["train_images_per_s"] = len(train) * recipe.epochs / timer.seconds if timer.seconds else None
        record["status"] = "ok"
    except Exception as e:  # a crashing or diverging run is recorded, and the sweep goes on
        if _disk_full(e):  # not the run's fault: stop the sweep with one line (`cli.main`), record nothing
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(spec.save_state or "")) from e
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=-8)
        if module is not None:
            record["train_loss"] = module.epoch_losses
            record["diagnostics"] = module.diagnostics
    peak, kind = _peak_memory()
    record.update(
        wall_time_s=time.perf_counter() - t0,
        peak_memory_mb=peak,
        peak_memory_kind=kind,
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        provenance=provenance(),
    )
    return record
