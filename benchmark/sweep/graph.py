"""The protocol of one method on one task as a graph of runs and decisions, walked stage by stage.

Per task: the grid search (protocol `grid`: every lr x weight-decay pair in `tune` mode with the tuning seed,
the best last-epoch val200 accuracy wins), the pruning stage of methods that prune, then one final run per seed.
`Sweep.run` answers a run from its result file, or claims and executes it; `Sweep.settle` is where a stage
waits for its runs (the inline sweep has just run them; the local/SLURM driver stops the walk there).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from benchmark.core.errors import UserError
from benchmark.data.arrays import SplitArrays, VTABDataModule
from benchmark.run.backbone import NORMALIZATIONS
from benchmark.run.results import grid_tune_path, read_result, run_path, write_json
from benchmark.run.runner import (
    TUNING_SEED,
    RunSpec,
    Settings,
    SweepData,
    compute_device,
    execute,
)
from benchmark.sweep.claims import claim_path, read_owner, try_claim
from benchmark.sweep.resume import conflict
from methods import MethodConfig
from tasks import Task

# How often a sweep looks again at a run that another process holds (seconds).
CLAIM_POLL_S = 2.0


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


class Sweep:
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
        record = read_result(path)
        return record is None or (self.retry_failed and record["status"] != "ok")

    def check(self, plan: Plan, deferred: bool) -> None:
        if why := conflict(plan.path, plan.spec, self.data, deferred=deferred):
            raise UserError(f"{why}; use another --results directory or delete the old results")

    def run(self, plan: Plan, *, deferred: bool = False) -> dict[str, Any]:
        """The plan's result: the stored one when it exists, else a new run, written atomically.

        The run is claimed first (`benchmark.sweep.claims`), so no other process runs it at the same time; one that
        holds it is waited for. Under the claim the stored result is checked again right before the write, so
        two sweeps of different configurations on one results directory never mix their runs.
        """
        self.check(plan, deferred)
        if not self.needs_run(plan.path):
            return read_result(plan.path)
        claim = self.claim(plan)
        try:
            self.check(plan, deferred)  # another process may have written it while we waited
            if not self.needs_run(plan.path):
                return read_result(plan.path)
            if claim.reclaimed_from:
                tqdm.write(f"{plan.path}: took over the run from {claim.reclaimed_from}", file=sys.stderr)
            spec = plan.spec
            self.bar.set_postfix_str(f"{spec.task.id} {plan.path.stem}")
            record = execute(spec, self.backbone, self.data, progress=self.run_progress)
            if not claim.held():
                raise UserError(
                    f"another process took over {plan.path} while it ran (its claim had gone stale); "
                    "run the same command again"
                )
            self.check(plan, deferred)
            write_json(plan.path, record)
        finally:
            claim.release()
        if record["status"] != "ok":
            tqdm.write(f"run {self.name}/{spec.task.id}/{plan.path.stem} failed: {record['error']}", file=sys.stderr)
        self.executed.append(record)
        self.bar.update(1)
        return record

    def claim(self, plan: Plan) -> Any:
        """The claim on the plan's result, waiting while another live process holds it."""
        while (claim := try_claim(plan.path)) is None:
            owner = read_owner(claim_path(plan.path)) or {}
            self.bar.set_postfix_str(f"waiting for {owner.get('host')}:{owner.get('pid')} to finish {plan.path.stem}")
            time.sleep(CLAIM_POLL_S)
        return claim

    def settle(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A stage's records, once every one exists: the inline sweep has just run them. (A launcher's driver
        overrides this to stop at a stage whose runs are still to come.)"""
        return records

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
        dense = self.settle([self.run(plan)])[0]
        if dense["status"] != "ok":
            raise StageError(f"the dense stage failed ({dense['error']})")
        pl.seed_everything(TUNING_SEED, workers=True, verbose=False)
        model = cfg.build(copy.deepcopy(self.backbone), task.num_classes).to(compute_device())
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
            # A fresh draw (seed + 1), not the dense stage's initial values, unless the candidate restores them.
            records = self.settle([
                self.run(Plan(RunSpec(cfg, task, TUNING_SEED + 1, "tune", self.protocol, self.settings, selection,
                                      prune_state=c.state, pruning={"stage": "rewind", "candidate": c.key, **c.info}),
                              plan.path.with_name(f"rewind-{c.key}.json")))
                for c in candidates
            ])  # fmt: skip
            scored = [
                (r["val_acc"], *c.preference, c)
                for r, c in zip(records, candidates, strict=True)
                if r["status"] == "ok"
            ]
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
                selection = select_grid_point(self.settle([self.run(p) for p in self.grid_plans(cfg, task)]))
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
    device = compute_device()
    for x, y in dm.train_dataloader():
        yield dm.on_after_batch_transfer((x.to(device), y.to(device)), 0)
