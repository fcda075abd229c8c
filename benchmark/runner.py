"""Runs: one (method, task, seed, hyperparameters) -> one result record; and the resumable sweep.

Protocols (the split protocol is code, never a convention):

- `final`: train on train800val200, report test accuracy after the last epoch.
- `tune`: train on train800, report val200 accuracy after the last epoch.
- `grid`: every (lr, weight decay) pair of the recipe's grid in `tune` mode with the tuning seed;
  the best last-epoch val200 accuracy wins (ties: smaller lr, then smaller weight decay); then
  `final` for each seed with the chosen pair, which every final result records.

No code path evaluates the test split before training has ended, or selects anything by it.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from benchmark.backbone import NORMALIZATIONS, create_backbone
from benchmark.data import SplitArrays, TaskData, VTABDataModule, load_split_images, normalize, scan_task
from benchmark.errors import UserError
from benchmark.module import ClassificationModule
from benchmark.results import (
    SCHEMA_VERSION,
    check_writable,
    grid_tune_path,
    provenance,
    read_json,
    run_path,
    write_json,
)
from methods import MethodConfig, PeftModel
from tasks import DataError, Task

log = logging.getLogger("peft_bench")

PROTOCOLS = ("final", "tune", "grid")
# Which split trains and which is evaluated, per run mode.
MODE_SPLITS = {"final": ("train800val200", "test"), "tune": ("train800", "val200")}
PROTOCOL_SPLITS = {
    "final": ("train800val200", "test"),
    "tune": ("train800", "val200"),
    "grid": ("train800", "val200", "train800val200", "test"),
}
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}
TUNING_SEED = 42


@dataclass(frozen=True)
class Settings:
    """What every run of a sweep shares besides the method: backbone, preprocessing, numerics.

    Attributes:
        backbone: timm model name.
        pretrained: whether pretrained weights were loaded (from `weights` or the Hub).
        weights: local checkpoint path, if any.
        image_size: input side in pixels (images are resized straight to it, no crop).
        interpolation: `bicubic` or `bilinear`.
        normalization: a key of `NORMALIZATIONS`.
        precision: `32` or `bf16` (autocast).
        cache_features: train frozen-feature methods (the linear probe) on features computed once.
        eval_batch_size: batch size of evaluation and feature extraction.
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

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {self.normalization!r}; pick one of {', '.join(NORMALIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; pick one of {', '.join(PRECISIONS)}")


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

    def config_dict(self) -> dict[str, Any]:
        """Everything that determines the run's outcome; two runs with equal dicts are the same run."""
        out = {
            "method": self.config.name,
            "task": self.task.id,
            "seed": self.seed,
            "protocol": self.protocol,
            "mode": self.mode,
            "method_config": self.config.to_dict(),
            **asdict(self.settings),
        }
        if self.selection is not None:
            out["selection"] = {k: self.selection[k] for k in ("lr", "weight_decay")}
        return out


@dataclass
class SweepData:
    """Decoded splits of every task of a sweep, plus features cached for frozen-feature methods."""

    tasks: dict[str, TaskData]
    arrays: dict[str, dict[str, SplitArrays]]
    features: dict[tuple[str, str], SplitArrays] = field(default_factory=dict)


def quiet_lightning() -> None:
    """Keep Lightning's per-run banners out of a sweep's output (its progress bar stays available)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*Trainer.fit.*stopped: `max_epochs=.*")


def prepare_data(
    root: Path, tasks: Iterable[Task], protocol: str, settings: Settings, cache_dir: Path | None = None
) -> SweepData:
    """Validate every task's split files, then decode (or load from the cache) every split needed.

    All validation happens before any decode, and all decoding before any training, so a data problem
    stops the sweep before its first run.
    """
    splits = PROTOCOL_SPLITS[protocol]
    try:
        scanned = {t.id: scan_task(Path(root), t, splits) for t in tasks}
        arrays = {
            tid: {
                s: load_split_images(td.splits[s], settings.image_size, settings.interpolation, cache_dir)
                for s in splits
            }
            for tid, td in scanned.items()
        }
    except DataError as e:
        raise UserError(str(e)) from None
    return SweepData(scanned, arrays)


class _TrainTimer(pl.Callback):
    """Wall time of the training epochs only (no set-up, no evaluation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._sync(module)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._sync(module)
        self.seconds += time.perf_counter() - self._start


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def extract_features(model: PeftModel, arrays: SplitArrays, settings: Settings) -> SplitArrays:
    """Pooled features of `model.forward_features` for a whole split (eval mode), as float32 arrays."""
    device = _device()
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
    # ru_maxrss is in KiB on Linux: the process's peak resident memory since it started.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def execute(spec: RunSpec, backbone: VisionTransformer, data: SweepData, *, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate one run; return its result record. Failures become `status: failed` records."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    train_split, eval_split = MODE_SPLITS[spec.mode]
    arrays = data.arrays[spec.task.id]
    record: dict[str, Any] = {
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
        "config": spec.config_dict(),
        "selection": spec.selection,
        "feature_extraction_s": None,
        "data": {
            "root": str(data.tasks[spec.task.id].dir.parent),
            "train_split": {
                "name": train_split,
                "size": len(arrays[train_split]),
                "sha256": arrays[train_split].sha256,
            },
            "eval_split": {"name": eval_split, "size": len(arrays[eval_split]), "sha256": arrays[eval_split].sha256},
        },
    }
    module = None
    try:
        pl.seed_everything(spec.seed, workers=True, verbose=False)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model = spec.config.build(copy.deepcopy(backbone), spec.task.num_classes)
        record["params"] = model.param_report().as_dict()
        train, evaluate = arrays[train_split], arrays[eval_split]
        inputs = "images"
        if model.features_frozen and spec.settings.cache_features:
            # The features do not depend on the seed or the head, so a sweep computes them once per split.
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
        )
        timer = _TrainTimer()
        trainer = pl.Trainer(
            max_epochs=recipe.epochs,
            accelerator="auto",
            devices=1,
            precision=PRECISIONS[spec.settings.precision],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(module, datamodule=datamodule)
        trainer.test(module, datamodule=datamodule, verbose=False)
        record["test_acc" if eval_split == "test" else "val_acc"] = module.eval_accuracy
        record["train_loss"] = module.epoch_losses
        record["train_images_per_s"] = len(train) * recipe.epochs / timer.seconds if timer.seconds else None
        record["status"] = "ok"
    except Exception as e:  # a crashing or diverging run is recorded, and the sweep goes on
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=-8)
        if module is not None:
            record["train_loss"] = module.epoch_losses
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


def select_grid_point(tune_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The best last-epoch val200 accuracy; ties go to the smaller lr, then the smaller weight decay."""
    ok = [r for r in tune_records if r["status"] == "ok" and r["val_acc"] is not None]
    if not ok:
        raise RuntimeError("every grid point failed, so no setting could be selected")
    best = min(
        ok,
        key=lambda r: (
            -r["val_acc"],
            r["config"]["method_config"]["recipe"]["lr"],
            r["config"]["method_config"]["recipe"]["weight_decay"],
        ),
    )
    recipe = best["config"]["method_config"]["recipe"]
    grid = [
        [
            r["config"]["method_config"]["recipe"]["lr"],
            r["config"]["method_config"]["recipe"]["weight_decay"],
            r["val_acc"] if r["status"] == "ok" else None,
        ]
        for r in tune_records
    ]
    return {
        "lr": recipe["lr"],
        "weight_decay": recipe["weight_decay"],
        "val_acc": best["val_acc"],
        "tuning_seed": best["seed"],
        "grid": grid,
    }


@dataclass
class Plan:
    """One planned run: its spec and where its result goes."""

    spec: RunSpec
    path: Path


def _identity(config: dict[str, Any], grid_final: bool) -> dict[str, Any]:
    """A stored or planned run config as compared for resuming (through JSON, as stored: tuples become lists).

    A grid protocol's final run is planned before its lr and weight decay are selected, so those
    (and the selection) are left out of its identity; the tuning runs pin them down.
    """
    config = json.loads(json.dumps(config))
    if grid_final:
        config.pop("selection", None)
        for key in ("lr", "weight_decay"):
            config.get("method_config", {}).get("recipe", {}).pop(key, None)
    return config


def _conflict(path: Path, spec: RunSpec) -> str | None:
    """Why an existing result at `path` cannot stand for `spec` (None when it can, or when there is none)."""
    record = read_json(path)
    if record is None:
        return None
    grid_final = spec.protocol == "grid" and spec.mode == "final"
    old, new = _identity(record.get("config", {}), grid_final), _identity(spec.config_dict(), grid_final)
    if old == new:
        return None
    return f"{path} was produced with a different configuration ({'; '.join(_diff(old, new)[:3])})"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def sweep(
    config: MethodConfig,
    tasks: list[Task],
    seeds: list[int],
    *,
    protocol: str,
    settings: Settings,
    data_root: Path,
    results: Path,
    recipe_overrides: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    run_progress: bool = False,
) -> list[dict[str, Any]]:
    """Run every (task, seed) of `config` under `protocol`, skipping runs whose result already exists.

    Everything that can be wrong with the input (data, backbone, results directory, a result file from
    a different configuration) is checked before the first run, and nothing is written before then.
    Returns the records of the runs this call executed.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; pick one of {', '.join(PROTOCOLS)}")
    overrides = dict(recipe_overrides or {})
    configs = {}
    for task in tasks:
        try:
            configs[task.id] = config.for_task(task.id).with_recipe(**overrides)
        except ValueError as e:
            raise UserError(f"{config.name} on {task.id}: {e}") from None
    if protocol == "grid":
        for task in tasks:
            r = configs[task.id].recipe
            if not r.lr_grid or not r.wd_grid:
                raise UserError(f"{config.name} has no lr/weight-decay grid; pass --lr-grid and --wd-grid")
    data = prepare_data(data_root, tasks, protocol, settings, cache_dir)
    check_writable(results)
    backbone = create_backbone(
        settings.backbone,
        pretrained=settings.pretrained,
        weights=settings.weights,
        image_size=settings.image_size,
        **config.backbone_kwargs(),
    )

    def needs_run(plan: Plan) -> bool:
        record = read_json(plan.path)
        return record is None or (retry_failed and record.get("status") != "ok")

    tune_plans: dict[str, list[Plan]] = {}
    final_plans: dict[str, list[Plan]] = {}
    for task in tasks:
        cfg = configs[task.id]
        if protocol == "grid":
            tune_plans[task.id] = [
                Plan(
                    RunSpec(cfg.with_recipe(lr=lr, weight_decay=wd), task, TUNING_SEED, "tune", "grid", settings),
                    grid_tune_path(results, config.name, task.id, lr, wd),
                )
                for lr in cfg.recipe.lr_grid
                for wd in cfg.recipe.wd_grid
            ]
        mode = "tune" if protocol == "tune" else "final"
        final_plans[task.id] = [
            Plan(
                RunSpec(cfg, task, seed, mode, protocol, settings),
                run_path(results, config.name, task.id, protocol, seed),
            )
            for seed in seeds
        ]
    conflicts = [
        c for plans in (*tune_plans.values(), *final_plans.values()) for p in plans if (c := _conflict(p.path, p.spec))
    ]
    if conflicts:
        raise UserError(f"{conflicts[0]}; use another --results directory or delete the old results")

    todo = sum(needs_run(p) for plans in (*tune_plans.values(), *final_plans.values()) for p in plans)
    executed: list[dict[str, Any]] = []
    if not run_progress:
        quiet_lightning()
    bar = tqdm(total=todo, desc=f"{config.name}", unit="run", disable=not progress or todo == 0)

    def do(plan: Plan) -> dict[str, Any]:
        spec = plan.spec
        bar.set_postfix_str(
            f"{spec.task.id} s{spec.seed}"
            + (f" lr={spec.config.recipe.lr:g}" if spec.mode == "tune" and protocol == "grid" else "")
        )
        record = execute(spec, backbone, data, progress=run_progress)
        write_json(plan.path, record)
        if record["status"] != "ok":
            tqdm.write(f"run {config.name}/{spec.task.id}/s{spec.seed} failed: {record['error']}", file=sys.stderr)
        executed.append(record)
        bar.update(1)
        return record

    for task in tasks:
        if protocol == "grid":
            tune_records = [do(p) if needs_run(p) else read_json(p.path) for p in tune_plans[task.id]]
            try:
                selection = select_grid_point(tune_records)
            except RuntimeError as e:
                selection = {"error": str(e)}
            for plan in final_plans[task.id]:
                if "error" in selection:
                    continue
                plan.spec.config = plan.spec.config.with_recipe(
                    lr=selection["lr"], weight_decay=selection["weight_decay"]
                )
                plan.spec.selection = selection
                if needs_run(plan):
                    do(plan)
            if "error" in selection:
                tqdm.write(f"{config.name}/{task.id}: {selection['error']}; no final runs", file=sys.stderr)
        else:
            for plan in final_plans[task.id]:
                if needs_run(plan):
                    do(plan)
    bar.close()
    return executed
