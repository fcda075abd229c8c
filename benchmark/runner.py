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
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.backbone import NORMALIZATIONS, create_backbone
from benchmark.data import SplitArrays, TaskData, VTABDataModule, load_split_images, normalize, scan_task
from benchmark.errors import UserError
from benchmark.module import ClassificationModule
from benchmark.perf import sync
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
DATA_ON_DEVICE = ("auto", "on", "off")
# Settings that change a run's speed, not its outcome: recorded, but not compared when resuming.
SPEED_ONLY = ("eval_batch_size", "compile", "data_on_device")
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
        image_size: input side in pixels (images are resized straight to it, no crop).
        interpolation: `bicubic` or `bilinear`.
        normalization: a key of `NORMALIZATIONS`.
        precision: `32` or `bf16` (autocast).
        cache_features: train frozen-feature methods (the linear probe) on features computed once.
        eval_batch_size: batch size of evaluation and feature extraction.
        compile: run the model through `torch.compile`.
        data_on_device: `auto` keeps a task's uint8 images on the GPU when they fit in a quarter of its
            free memory (batches are then gathered there: no host-to-device copy per step); `on` always
            (also on a CPU, where it only changes how batches are gathered); `off` never.

    `eval_batch_size`, `compile` and `data_on_device` change how fast a run goes, not what it computes,
    so they are recorded with each result but are not part of its identity (`SPEED_ONLY`).

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

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise UserError(f"unknown budget {self.budget!r}; pick one of {', '.join(BUDGETS)}")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {self.normalization!r}; pick one of {', '.join(NORMALIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; pick one of {', '.join(PRECISIONS)}")
        if self.data_on_device not in DATA_ON_DEVICE:
            raise UserError(f"unknown data_on_device {self.data_on_device!r}; pick one of {', '.join(DATA_ON_DEVICE)}")


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
        if out["budget"] == "full":
            del out["budget"]  # the default: results written before budgets existed keep their identity
        if self.selection is not None:
            out["selection"] = {k: self.selection[k] for k in ("lr", "weight_decay")}
        if self.pruning is not None:
            out["pruning"] = {k: self.pruning[k] for k in ("stage", "candidate") if k in self.pruning}
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
    root: Path, tasks: Iterable[Task], splits: tuple[str, ...], settings: Settings, cache_dir: Path | None = None
) -> SweepData:
    """Validate every task's split files, then decode (or load from the cache) every split needed.

    All validation happens before any decode, and all decoding before any training, so a data problem
    stops the sweep before its first run.
    """
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

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(module.device)
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
        },
    }
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
            on_device=spec.settings.data_on_device if inputs == "images" else "off",
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
            inference_mode=True,  # evaluation under torch.inference_mode
            callbacks=[timer],
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


class StageError(RuntimeError):
    """An earlier stage of a task's pipeline failed, so its later stages cannot run."""


def select_grid_point(tune_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The best last-epoch val200 accuracy; ties go to the smaller lr, then the smaller weight decay."""
    ok = [r for r in tune_records if r["status"] == "ok" and r["val_acc"] is not None]
    if not ok:
        raise StageError("every grid point failed, so no setting could be selected")
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


def _identity(config: dict[str, Any], *, deferred: bool, grid: bool) -> dict[str, Any]:
    """A stored or planned run config as compared for resuming (through JSON, as stored: tuples become lists).

    A run planned before an earlier stage decides part of its config (the grid's lr and weight decay, a
    pruning stage's candidate) is compared without those parts: the earlier stage's own results pin them.
    """
    config = json.loads(json.dumps(config))
    for key in SPEED_ONLY:
        config.pop(key, None)
    if deferred:
        config.pop("selection", None)
        config.pop("pruning", None)
        if grid:
            for key in ("lr", "weight_decay"):
                config.get("method_config", {}).get("recipe", {}).pop(key, None)
    return config


def _conflict(path: Path, spec: RunSpec, data: SweepData, *, deferred: bool = False) -> str | None:
    """Why an existing result at `path` cannot stand for `spec` (None when it can, or when there is none)."""
    record = read_json(path)
    if record is None:
        return None
    splits = data.arrays[spec.task.id]
    for role, split in zip(("train_split", "eval_split"), MODE_SPLITS[spec.mode], strict=True):
        if record.get("data", {}).get(role, {}).get("sha256") != splits[split].sha256:
            return f"{path} was produced from a different {split}.txt of {spec.task.id} (its sha256 differs)"
    grid = spec.protocol == "grid"
    old = _identity(record.get("config", {}), deferred=deferred, grid=grid)
    new = _identity(spec.config_dict(), deferred=deferred, grid=grid)
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


class _Sweep:
    """The runs of one method over tasks and seeds: grid search, pruning stage, final runs; resumable."""

    def __init__(self, config: MethodConfig, *, protocol: str, settings: Settings, results: Path,
                 backbone: VisionTransformer, data: SweepData, retry_failed: bool, run_progress: bool,
                 save_tunable: bool = False) -> None:  # fmt: skip
        self.name, self.protocol, self.settings, self.results = config.name, protocol, settings, results
        self.save_tunable = save_tunable
        self.backbone, self.data = backbone, data
        self.retry_failed, self.run_progress = retry_failed, run_progress
        self.executed: list[dict[str, Any]] = []
        self.bar: Any = None

    def task_dir(self, task: Task) -> Path:
        return self.results / "runs" / self.name / task.id

    def needs_run(self, path: Path) -> bool:
        record = read_json(path)
        return record is None or (self.retry_failed and record.get("status") != "ok")

    def run(self, plan: Plan, *, deferred: bool = False) -> dict[str, Any]:
        """The plan's result: the stored one when it exists, else a new run, written atomically."""
        if conflict := _conflict(plan.path, plan.spec, self.data, deferred=deferred):
            raise UserError(f"{conflict}; use another --results directory or delete the old results")
        if not self.needs_run(plan.path):
            return read_json(plan.path)
        spec = plan.spec
        self.bar.set_postfix_str(f"{spec.task.id} {plan.path.stem}")
        record = execute(spec, self.backbone, self.data, progress=self.run_progress)
        write_json(plan.path, record)
        if record["status"] != "ok":
            tqdm.write(f"run {self.name}/{spec.task.id}/{plan.path.stem} failed: {record['error']}", file=sys.stderr)
        self.executed.append(record)
        self.bar.update(1)
        return record

    def add_to_plan(self, n: int) -> None:
        self.bar.total = (self.bar.total or 0) + n
        self.bar.refresh()

    # -- stages ------------------------------------------------------------------------------------------
    def grid_plans(self, cfg: MethodConfig, task: Task) -> list[Plan]:
        return [
            Plan(RunSpec(cfg.with_recipe(lr=lr, weight_decay=wd), task, TUNING_SEED, "tune", "grid", self.settings),
                 grid_tune_path(self.results, self.name, task.id, lr, wd))
            for lr in cfg.recipe.lr_grid for wd in cfg.recipe.wd_grid
        ]  # fmt: skip

    def final_plans(self, cfg: MethodConfig, task: Task, seeds: list[int]) -> list[Plan]:
        mode = "tune" if self.protocol == "tune" else "final"
        paths = [run_path(self.results, self.name, task.id, self.protocol, seed) for seed in seeds]
        return [Plan(RunSpec(cfg, task, seed, mode, self.protocol, self.settings,
                             save_state=path.with_suffix("") if self.save_tunable else None), path)
                for seed, path in zip(seeds, paths, strict=True)]  # fmt: skip

    def dense_plan(self, cfg: MethodConfig, task: Task, selection: dict[str, Any] | None) -> Plan:
        stem = self.task_dir(task) / f"{self.protocol}-prune" / "dense"
        spec = RunSpec(cfg, task, TUNING_SEED, "tune", self.protocol, self.settings, selection,
                       pruning={"stage": "dense"}, save_state=stem)  # fmt: skip
        return Plan(spec, stem.with_suffix(".json"))

    def prune(self, cfg: MethodConfig, task: Task, selection: dict[str, Any] | None) -> dict[str, Any]:
        """Dense stage on train800, the method's pruning decision, then the rewind search on val200.

        Returns the chosen candidate's state and a record of the search for the final runs.
        """
        plan = self.dense_plan(cfg, task, selection)
        state_files = [plan.spec.save_state.with_name(f"dense{s}.safetensors") for s in ("", "-init")]
        if not all(f.is_file() for f in state_files) and not self.needs_run(plan.path):
            plan.path.unlink()  # a result without its saved state cannot seed the pruning decision
        dense = self.run(plan)
        if dense["status"] != "ok":
            raise StageError(f"the dense stage failed ({dense['error']})")
        pl.seed_everything(TUNING_SEED, workers=True, verbose=False)
        model = cfg.build(copy.deepcopy(self.backbone), task.num_classes).to(_device())
        model.load_tunable(state_files[0])
        batches = _normalised_batches(self.data.arrays[task.id]["train800"], cfg, self.settings)
        try:
            candidates = cfg.prune_candidates(model, load_file(str(state_files[1])), batches)
        except Exception as e:  # recorded like a failed run: this task stops, the sweep goes on
            raise StageError(f"the pruning decision failed ({type(e).__name__}: {e})") from e
        del model
        write_json(plan.path.with_name("candidates.json"), [{"key": c.key, **c.info} for c in candidates])
        if len(candidates) == 1:
            chosen, search = candidates[0], []
        else:
            self.add_to_plan(sum(self.needs_run(plan.path.with_name(f"rewind-{c.key}.json")) for c in candidates))
            scored = []
            for c in candidates:
                # A fresh draw (seed + 1), not the dense stage's initial values, unless the candidate restores them.
                spec = RunSpec(cfg, task, TUNING_SEED + 1, "tune", self.protocol, self.settings, selection,
                               prune_state=c.state, pruning={"stage": "rewind", "candidate": c.key, **c.info})  # fmt: skip
                record = self.run(Plan(spec, plan.path.with_name(f"rewind-{c.key}.json")))
                if record["status"] == "ok":
                    scored.append((record["val_acc"], *c.preference, c))
            if not scored:
                raise StageError("every rewind run failed, so no pruning candidate could be selected")
            chosen = max(scored, key=lambda t: t[:-1])[-1]
            search = [[c.key, acc] for acc, *_, c in scored]
        info = {"stage": "final", "candidate": chosen.key, **chosen.info, "dense_val_acc": dense["val_acc"],
                "search": search}  # fmt: skip
        return {"state": chosen.state, "info": info}

    def task(self, cfg: MethodConfig, task: Task, seeds: list[int]) -> None:
        selection = None
        finals = self.final_plans(cfg, task, seeds)
        try:
            if self.protocol == "grid":
                selection = select_grid_point([self.run(p) for p in self.grid_plans(cfg, task)])
                cfg = cfg.with_recipe(lr=selection["lr"], weight_decay=selection["weight_decay"])
            pruning = self.prune(cfg, task, selection) if cfg.prunes else None
        except StageError as e:
            tqdm.write(f"{self.name}/{task.id}: {e}; no final runs", file=sys.stderr)
            return
        for plan in finals:
            plan.spec.config, plan.spec.selection = cfg, selection
            if pruning is not None:
                plan.spec.prune_state, plan.spec.pruning = pruning["state"], pruning["info"]
            self.run(plan, deferred=True)


def _normalised_batches(arrays: SplitArrays, cfg: MethodConfig, settings: Settings):
    """The split's training batches (seeded shuffle), normalised on the compute device."""
    mean, std = NORMALIZATIONS[settings.normalization]
    dm = VTABDataModule(arrays, arrays, batch_size=cfg.recipe.batch_size, seed=TUNING_SEED, mean=mean, std=std)
    device = _device()
    for x, y in dm.train_dataloader():
        yield dm.on_after_batch_transfer((x.to(device), y.to(device)), 0)


def sweep(
    config: MethodConfig,
    tasks: list[Task],
    seeds: list[int],
    *,
    protocol: str,
    settings: Settings,
    data_root: Path,
    results: Path,
    options: dict[str, str] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    task_overrides: dict[str, dict[str, Any]] | None = None,
    cache_dir: Path | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    run_progress: bool = False,
    save_tunable: bool = False,
) -> list[dict[str, Any]]:
    """Run every (task, seed) of `config` under `protocol`, skipping runs whose result already exists.

    Per task: the grid search (protocol `grid`), the pruning stage (methods that prune: a dense run on
    train800, the method's candidates, a rewind run of each scored on val200), then one final run per
    seed. Everything that can be wrong with the input (data, backbone, results directory, a result file
    from a different configuration) is checked before the first run, and nothing is written before then.
    `task_overrides` adds recipe overrides per task id on top of `recipe_overrides` (e.g. a grid in
    learning rates scaled by each task's batch size). `save_tunable` saves each final run's trained tunable
    state (plus head) beside its result (`<protocol>-s<seed>.safetensors`, for `export`). Returns the records
    of the runs this call executed.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; pick one of {', '.join(PROTOCOLS)}")
    overrides = dict(recipe_overrides or {})
    configs = {}
    for task in tasks:
        try:
            task_recipe = {**overrides, **(task_overrides or {}).get(task.id, {})}
            configs[task.id] = config.for_task(task.id).with_options(options or {}).with_recipe(**task_recipe)
        except ValueError as e:
            raise UserError(f"{config.name} on {task.id}: {e}") from None
        r = configs[task.id].recipe
        if protocol == "grid" and (not r.lr_grid or not r.wd_grid):
            raise UserError(f"{config.name} has no lr/weight-decay grid; pass --lr-grid and --wd-grid")
    # A pruning stage decides on train800 -> val200 whatever the protocol.
    pruning = any(c.prunes for c in configs.values())
    splits = PROTOCOL_SPLITS["grid"] if pruning else PROTOCOL_SPLITS[protocol]
    data = prepare_data(data_root, tasks, splits, settings, cache_dir)
    check_writable(results)
    backbone = create_backbone(settings.backbone, pretrained=settings.pretrained, weights=settings.weights,
                               image_size=settings.image_size, **config.backbone_kwargs())  # fmt: skip
    for task in tasks:
        try:
            configs[task.id].check_backbone(backbone)
        except ValueError as e:
            raise UserError(f"{config.name} on {task.id}: {e}") from None
    state = _Sweep(config, protocol=protocol, settings=settings, results=results, backbone=backbone, data=data,
                   retry_failed=retry_failed, run_progress=run_progress, save_tunable=save_tunable)  # fmt: skip
    # Checked up front for the runs whose identity is known before any training.
    known: list[tuple[Plan, bool]] = []
    for task in tasks:
        cfg = configs[task.id]
        if protocol == "grid":
            known += [(p, False) for p in state.grid_plans(cfg, task)]
        elif cfg.prunes:
            known.append((state.dense_plan(cfg, task, None), False))
        known += [(p, True) for p in state.final_plans(cfg, task, seeds)]
    conflicts = [c for p, deferred in known if (c := _conflict(p.path, p.spec, data, deferred=deferred))]
    if conflicts:
        raise UserError(f"{conflicts[0]}; use another --results directory or delete the old results")

    if not run_progress:
        quiet_lightning()
    todo = sum(state.needs_run(p.path) for p, _ in known)
    todo += sum(configs[t.id].prunes and protocol == "grid" for t in tasks)  # the dense runs after a grid
    state.bar = tqdm(total=todo, desc=config.name, unit="run", disable=not progress)
    try:
        for task in tasks:
            state.task(configs[task.id], task, seeds)
    finally:
        state.bar.close()
    return state.executed
