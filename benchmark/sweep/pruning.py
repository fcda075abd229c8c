"""The pruning stage of a task's graph: a dense run, the method's pruning decision (candidates), the rewind search
on validation and its choice; each decision a file written once (`benchmark.sweep.decisions`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from safetensors.torch import load_file

from benchmark.data.arrays import SplitArrays, VTABDataModule
from benchmark.run.backbone import NORMALIZATIONS
from benchmark.run.runner import TUNING_SEED, RunSpec, Settings, compute_device
from benchmark.run.splits import mode_splits
from benchmark.sweep.decisions import (
    StoredCandidates,
    decisions_dir,
    file_hash,
    json_hash,
    read_candidates,
    record_digest,
    result_digest,
    write_candidates,
)
from benchmark.sweep.plan import Plan, StageError
from methods import MethodConfig, PruneCandidate
from tasks import Task


class PruningStage:
    """`Sweep`'s pruning stage (a mixin: it runs and decides through the sweep's `run`, `settle`, `claim`,
    `current` and `decide`)."""

    def candidates_path(self, task: Task) -> Path:
        return decisions_dir(self.task_dir(task)) / f"{self.protocol}-prune-candidates.safetensors"

    def pruning_candidates(self, dense: Plan) -> StoredCandidates:
        """The method's pruning candidates for the dense run: the stored decision when current, else computed
        here (`decide_pruning`; the local/SLURM driver hands that to a worker instead)."""
        path = self.candidates_path(dense.spec.task)
        stored = self.current(path, read_candidates, dense_inputs(dense))
        return stored if stored is not None else self.decide_pruning(dense, path)

    def decide_pruning(self, dense: Plan, path: Path) -> StoredCandidates:
        """Compute the method's pruning candidates from the dense run's trained and initial state (or, for a decision
        made from the pretrained model, from the freshly built one), on this process's device, and write them once
        under the claim of `path`."""
        inputs = dense_inputs(dense)
        with self.claim(path):
            if (stored := self.current(path, read_candidates, inputs)) is not None:
                return stored
            cfg, task = dense.spec.config, dense.spec.task
            pl.seed_everything(TUNING_SEED, workers=True, verbose=False)
            model = cfg.build(copy.deepcopy(self.backbones(cfg)), task.num_classes).to(compute_device())
            if cfg.trains_dense:
                trained, initial = dense_states(dense.path)
                model.load_tunable(trained)
                initial_state = load_file(str(initial))
            else:
                initial_state = {k: v.detach().clone() for k, v in model.tunable_state_dict().items()}
            split = mode_splits(task, "tune")[1 if cfg.decides_on == "eval" else 0]
            batches = normalised_batches(self.data.arrays[task.id][split], cfg, self.settings)
            try:
                candidates = cfg.prune_candidates(model, initial_state, batches)
            except Exception as e:  # recorded like a failed run: this task stops, the sweep goes on
                raise StageError(f"the pruning decision failed ({type(e).__name__}: {e})") from e
            return write_candidates(path, candidates, inputs)

    # -- stages ------------------------------------------------------------------------------------------
    def dense_plan(self, cfg: MethodConfig, task: Task, selection: dict[str, Any] | None,
                   decisions: dict[str, str] | None = None) -> Plan:  # fmt: skip
        stem = self.task_dir(task) / f"{self.protocol}-prune" / "dense"
        spec = RunSpec(cfg.dense_config(), task, TUNING_SEED, "tune", self.protocol, self.settings, selection,
                       pruning={"stage": "dense"}, save_state=stem, decisions=decisions)  # fmt: skip
        return Plan(spec, stem.with_suffix(".json"))

    def prune(self, cfg: MethodConfig, task: Task, selection: dict[str, Any] | None,
              decisions: dict[str, str]) -> dict[str, Any]:  # fmt: skip
        """Dense stage on the tuning split, the method's pruning decision, then the rewind search on validation.

        Returns the chosen candidate's state, a record of the search for the final runs, and the hash of the
        choice (a decision file over the candidates' file, both written once).
        """
        plan = self.dense_plan(cfg, task, selection, decisions)
        dense: dict[str, Any] = {"val_acc": None}  # a decision from the pretrained model has no dense run
        if cfg.trains_dense:
            dense = self.settle([self.run(plan, outputs=dense_states(plan.path))])[0]
            if dense["status"] != "ok":
                raise StageError(f"the dense stage failed ({dense['error']})")
        stored = self.pruning_candidates(plan)
        candidates = [PruneCandidate(**c) for c in stored.candidates]
        rewinds = [
            Plan(RunSpec(cfg, task, TUNING_SEED + 1, "tune", self.protocol, self.settings, selection,
                         prune_state=c.state, pruning={"stage": "rewind", "candidate": c.key, **c.info},
                         decisions={**decisions, "candidates": stored.sha256}),
                 plan.path.with_name(f"rewind-{c.key}.json"))
            for c in candidates
        ] if len(candidates) > 1 else []  # fmt: skip
        # A fresh draw (seed + 1), not the dense stage's initial values, unless the candidate restores them.
        self.add_to_plan(sum(self.needs_run(p.path) for p in rewinds))
        records = self.settle([self.run(p) for p in rewinds])
        inputs = {"candidates": stored.sha256,
                  **{p.path.name: record_digest(r) for p, r in zip(rewinds, records, strict=True)}}  # fmt: skip

        def compute() -> tuple[dict[str, Any], dict[str, Any]]:
            if not rewinds:
                return {"candidate": candidates[0].key, "candidates": stored.sha256}, {"search": []}
            scored = [(r["val_acc"], *c.preference, c) for r, c in zip(records, candidates, strict=True)
                      if r["status"] == "ok"]  # fmt: skip
            if not scored:
                raise StageError("every rewind run failed, so no pruning candidate could be selected")
            chosen = max(scored, key=lambda t: t[:-1])[-1]
            return {"candidate": chosen.key, "candidates": stored.sha256}, {
                "search": [[c.key, a] for a, *_, c in scored]
            }

        choice = self.decide(
            decisions_dir(self.task_dir(task)) / f"{self.protocol}-prune-choice.json", inputs, compute
        )
        chosen = next(c for c in candidates if c.key == choice["candidate"])
        info = {"stage": "final", "candidate": chosen.key, **chosen.info, "dense_val_acc": dense["val_acc"],
                "search": choice["about"]["search"], "decision": choice["sha256"]}  # fmt: skip
        if not cfg.trains_dense:
            del info["dense_val_acc"]
        return {"state": chosen.state, "info": info, "sha256": choice["sha256"]}


def dense_states(dense: Path) -> tuple[Path, Path]:
    """The dense run's trained and initial tunable state, beside its result."""
    return dense.with_name(f"{dense.stem}.safetensors"), dense.with_name(f"{dense.stem}-init.safetensors")


def dense_inputs(dense: Plan) -> dict[str, Any]:
    """What a pruning decision is made from: the dense run's result and both of its states; for a decision made
    from the pretrained model, the identity of the model and data it is computed on (the dense run's config)."""
    if not dense.spec.config.trains_dense:
        return {"pretrained": json_hash(dense.spec.config_dict())}
    trained, initial = dense_states(dense.path)
    return {
        "dense": result_digest(dense.path),
        **{f.name: file_hash(f) if f.is_file() else None for f in (trained, initial)},
    }


def normalised_batches(arrays: SplitArrays, cfg: MethodConfig, settings: Settings):
    """The split's training batches (seeded shuffle), normalised on the compute device."""
    mean, std = NORMALIZATIONS[settings.normalization]
    dm = VTABDataModule(arrays, arrays, batch_size=cfg.recipe.batch_size, seed=TUNING_SEED, mean=mean, std=std)
    device = compute_device()
    for batch in dm.train_dataloader():  # (images, labels), plus the flips of a crop_flip suite's random crops
        yield dm.on_after_batch_transfer(tuple(t.to(device) for t in batch), 0)
