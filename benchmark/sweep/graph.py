"""The protocol of one method on one task as a graph of runs and decisions, walked stage by stage.

Per task: the grid search (protocol `grid`: every lr x weight-decay pair in `tune` mode with the tuning seed,
the best last-epoch validation accuracy wins; the splits are the task's suite's), the pruning stage of methods that prune, then one final run per seed.
`Sweep.run` answers a run from its result file, or claims and executes it; `Sweep.settle` is where a stage
waits for its runs (the inline sweep has just run them; the local/SLURM driver stops the walk there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark.core.errors import UserError
from benchmark.run.resolve import Backbones
from benchmark.run.results import grid_tune_path, read_result, run_path, write_result
from benchmark.run.runner import (
    TUNING_SEED,
    RunSpec,
    Settings,
    SweepData,
    execute,
)
from benchmark.sweep.claims import claim_path, read_owner, try_claim
from benchmark.sweep.decisions import (
    DecisionError,
    StoredCandidates,
    decisions_dir,
    read_json_decision,
    record_digest,
    write_json_decision,
)
from benchmark.sweep.plan import Plan, StageError
from benchmark.sweep.pruning import PruningStage
from benchmark.sweep.resume import conflict, stale_version
from methods import MethodConfig
from tasks import Task

# How often a sweep looks again at a run that another process holds (seconds).
CLAIM_POLL_S = 2.0


def select_grid_point(tune_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The best last-epoch validation accuracy (VTAB-1k: val200); ties go to the smaller lr, then the smaller weight decay."""
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


class Sweep(PruningStage):
    """The runs of one method over tasks and seeds: grid search, pruning stage, final runs; resumable."""

    def __init__(self, config: MethodConfig, *, protocol: str, settings: Settings, results: Path,
                 backbones: Backbones, data: SweepData, retry_failed: bool, run_progress: bool,
                 save_tunable: bool = False, rerun_stale: bool = False) -> None:  # fmt: skip
        self.name, self.protocol, self.settings, self.results = config.name, protocol, settings, results
        self.save_tunable = save_tunable
        self.backbones, self.data = backbones, data
        self.retry_failed, self.run_progress = retry_failed, run_progress
        self.rerun_stale = rerun_stale
        self.executed: list[dict[str, Any]] = []
        self.bar: Any = None

    def task_dir(self, task: Task) -> Path:
        return self.results / "runs" / self.name / task.id

    def needs_run(self, path: Path) -> bool:
        record = read_result(path)
        return record is None or (self.retry_failed and record["status"] != "ok")

    def check(self, plan: Plan, deferred: bool) -> bool:
        """Whether the stored result at the plan's path is stale: trained under an earlier decision than the plan's
        (the grid's winner, a pruning stage's masks). UserError for a result of another configuration, and for a
        stale one without `--rerun-stale`."""
        record = read_result(plan.path) if self.rerun_stale else None
        if record is not None and (why := stale_version(record, plan.path, plan.spec, self.data, deferred=deferred)):
            self.note(f"{self.name}/{plan.spec.task.id}: {why}; rerun")
            return True
        if not (why := conflict(plan.path, plan.spec, self.data, deferred=deferred)):
            return False
        if deferred or conflict(plan.path, plan.spec, self.data, deferred=True):
            raise UserError(f"{why}; use another --results directory or delete the old results")
        if not self.rerun_stale:
            raise UserError(
                f"{plan.path} was trained under an earlier decision than the current one ({stale_detail(why)}); "
                "pass --rerun-stale to rerun the runs that depend on it"
            )
        self.note(f"{self.name}/{plan.spec.task.id}: {plan.path.name} was trained under an earlier decision; rerun")
        return True

    def stored(self, plan: Plan, deferred: bool, outputs: tuple[Path, ...] = ()) -> dict[str, Any] | None:
        """The stored result that stands for the plan, or None when the plan must run: no result, a failed one
        under `--retry-failed`, a stale one under `--rerun-stale`, or one whose `outputs` files are missing."""
        stale = self.check(plan, deferred)
        if stale or self.needs_run(plan.path) or not all(f.is_file() for f in outputs):
            return None
        return read_result(plan.path)

    def run(self, plan: Plan, *, deferred: bool = False, outputs: tuple[Path, ...] = ()) -> dict[str, Any]:
        """The plan's result: the stored one when it stands for the plan, else a new run, written atomically.

        The run is claimed first (`benchmark.sweep.claims`), so no other process runs it at the same time; one that
        holds it is waited for. Under the claim the stored result is checked again right before the write, so
        two sweeps of different configurations on one results directory never mix their runs.
        """
        if (record := self.stored(plan, deferred, outputs)) is not None:
            return record
        claim = self.claim(plan.path)
        try:
            if (record := self.stored(plan, deferred, outputs)) is not None:
                return record  # another process wrote it while we waited
            if claim.reclaimed_from:
                tqdm.write(f"{plan.path}: took over the run from {claim.reclaimed_from}", file=sys.stderr)
            spec = plan.spec
            self.bar.set_postfix_str(f"{spec.task.id} {plan.path.stem}")
            record = execute(
                spec, self.backbones(spec.config), self.data, progress=self.run_progress, result=plan.path
            )
            if not claim.held():
                raise UserError(
                    f"another process took over {plan.path} while it ran (its claim had gone stale); "
                    "run the same command again"
                )
            self.check(plan, deferred)
            write_result(plan.path, record)
        finally:
            claim.release()
        if record["status"] != "ok":
            tqdm.write(f"run {self.name}/{spec.task.id}/{plan.path.stem} failed: {record['error']}", file=sys.stderr)
        self.executed.append(record)
        self.bar.update(1)
        return record

    def claim(self, path: Path) -> Any:
        """The claim on a result or decision file, waiting while another live process holds it."""
        while (claim := try_claim(path)) is None:
            owner = read_owner(claim_path(path)) or {}
            self.bar.set_postfix_str(f"waiting for {owner.get('host')}:{owner.get('pid')} to finish {path.stem}")
            time.sleep(CLAIM_POLL_S)
        return claim

    def settle(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A stage's records, once every one exists: the inline sweep has just run them. (A launcher's driver
        overrides this to stop at a stage whose runs are still to come.)"""
        return records

    def add_to_plan(self, n: int) -> None:
        self.bar.total = (self.bar.total or 0) + n
        self.bar.refresh()

    def note(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    # -- decisions -----------------------------------------------------------------------------------------
    def current(self, path: Path, read: Any, inputs: dict[str, Any]) -> Any:
        """The decision stored at `path` when it was made from `inputs` (None when there is none, or when it is
        stale or corrupt and `--rerun-stale` asks to decide again); UserError for a stale or corrupt one
        otherwise."""
        try:
            stored = read(path)
        except DecisionError:
            if not self.rerun_stale:
                raise
            return None
        if stored is None or stored_inputs(stored) == inputs:
            return stored
        if not self.rerun_stale:
            raise UserError(
                f"{path} was decided from results that have changed since (a rerun or a retried run); pass "
                "--rerun-stale to decide again and rerun the runs that depend on it"
            )
        return None

    def decide(self, path: Path, inputs: dict[str, Any], compute: Any) -> dict[str, Any]:
        """A JSON decision: the stored one when current, else `compute()` -> (decision, about), written once
        under the claim of `path`."""
        if (stored := self.current(path, read_json_decision, inputs)) is not None:
            return stored
        with self.claim(path):
            if (stored := self.current(path, read_json_decision, inputs)) is not None:
                return stored
            decision, about = compute()
            return write_json_decision(path, decision, inputs, about)

    def select(self, task: Task, plans: list[Plan], records: list[dict[str, Any]]) -> dict[str, Any]:
        """The grid's winner (`select_grid_point`) as a decision file; the selection the final runs record."""
        inputs = {p.path.name: record_digest(r) for p, r in zip(plans, records, strict=True)}

        def compute() -> tuple[dict[str, Any], dict[str, Any]]:
            point = select_grid_point(records)
            return {k: point[k] for k in ("lr", "weight_decay", "tuning_seed")}, point

        stored = self.decide(decisions_dir(self.task_dir(task)) / "grid-selection.json", inputs, compute)
        return {**stored["about"], "sha256": stored["sha256"]}

    def grid_plans(self, cfg: MethodConfig, task: Task, pruning: dict[str, Any] | None = None) -> list[Plan]:
        """The grid points; under a decision made from the pretrained model (`pruning`), each carries it."""
        plans = [
            Plan(RunSpec(cfg.with_recipe(lr=lr, weight_decay=wd), task, TUNING_SEED, "tune", "grid", self.settings),
                 grid_tune_path(self.results, self.name, task.id, lr, wd))
            for lr in cfg.recipe.lr_grid for wd in cfg.recipe.wd_grid
        ]  # fmt: skip
        for plan in plans if pruning is not None else []:
            plan.spec.prune_state, plan.spec.pruning = pruning["state"], {**pruning["info"], "stage": "grid"}
            plan.spec.decisions = {"pruning": pruning["sha256"]}
        return plans

    def final_plans(self, cfg: MethodConfig, task: Task, seeds: list[int]) -> list[Plan]:
        mode = "tune" if self.protocol == "tune" else "final"
        paths = [run_path(self.results, self.name, task.id, self.protocol, seed) for seed in seeds]
        return [Plan(RunSpec(cfg, task, seed, mode, self.protocol, self.settings,
                             save_state=path.with_suffix("") if self.save_tunable else None), path)
                for seed, path in zip(seeds, paths, strict=True)]  # fmt: skip

    def task(self, cfg: MethodConfig, task: Task, seeds: list[int]) -> None:
        """Walk one task's graph: grid points -> selection -> dense -> pruning decision -> rewinds -> choice ->
        final seeds. Every decision is a file (`benchmark.sweep.decisions`) whose hash the runs after it carry in
        their identity, so each final run is checked against the decisions it was trained under. A decision made
        from the pretrained model (`MethodConfig.decides_from`) comes first, and the grid points carry it too."""
        selection, decisions, pruning = None, {}, None
        finals = self.final_plans(cfg, task, seeds)
        try:
            if cfg.prunes and not cfg.trains_dense:
                pruning = self.prune(cfg, task, None, {})
            if self.protocol == "grid":
                plans = self.grid_plans(cfg, task, pruning)
                selection = self.select(task, plans, self.settle([self.run(p) for p in plans]))
                decisions["selection"] = selection["sha256"]
                cfg = cfg.with_recipe(lr=selection["lr"], weight_decay=selection["weight_decay"])
            if cfg.trains_dense:
                pruning = self.prune(cfg, task, selection, decisions)
        except StageError as e:
            tqdm.write(f"{self.name}/{task.id}: {e}; no final runs", file=sys.stderr)
            return
        for plan in finals:
            plan.spec.config, plan.spec.selection = cfg, selection
            plan.spec.decisions = {**decisions, **({"pruning": pruning["sha256"]} if pruning else {})}
            if pruning is not None:
                plan.spec.prune_state, plan.spec.pruning = pruning["state"], pruning["info"]
            self.run(plan)


def stored_inputs(stored: Any) -> Any:
    return stored.inputs if isinstance(stored, StoredCandidates) else stored["inputs"]


def stale_detail(why: str) -> str:
    """The differing fields of a conflict message, e.g. `decisions.selection: 'ab12..' -> 'cd34..'`."""
    return why.rpartition("(")[2].rstrip(")") if "(" in why else why
