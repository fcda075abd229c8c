"""`reproduce`: one method's published protocol on a suite (VTAB-1k, FGVC), run through the runner, then `compare`.

`PAPER_PROTOCOLS` writes down, per method with reported numbers, the protocol of the paper (or code)
that produced them, from the project's notes (`docs/methods/prompts.md`, `docs/methods/adapters.md`,
`docs/methods/baselines.md`, `docs/protocols.md`):

- `vpt_shallow`, `vpt_deep`, `e2vpt`, `linear`, `full`: the `grid` protocol. Every (lr, weight decay)
  of the spec's grid trains on train800 and is scored on val200 at its last epoch (tuning seed 42; ties
  to the smaller lr, then the smaller weight decay); then seeds 42, 44, 82, 100, 800 train on
  train800val200 with the chosen pair and report the last-epoch test accuracy. Learning rates are the
  spec's base values × batch/256, with each task's batch size (64 or 128 for VPT). E²VPT's pruning
  search (dense run, importance scores, every token × segment level pair rewound and scored on val200)
  runs inside the runner between the grid and the final runs. Per-task settings (prompt lengths,
  batch sizes, E²VPT's P and N_kv) come from the method configs, which hold the specs' tables.
- `convpass`, `convpass_attn`: no grid exists (lr 1e-3 and weight decay 1e-4 are fixed; s per task from
  the official configs), so the `final` protocol with that recipe and the same five seeds. The
  published numbers were selected on the test set (best of ten test evaluations, one seed); the suite
  never does that, so `compare` marks the protocols as different and last-epoch numbers run lower.
- The table baselines (`docs/methods/adapters.md`, `docs/methods/reparameterisation.md`), keyed by
  name: `lora`, `adapter` (NOAH's fixed recipe), `fact_tt`, `fact_tk` (per-task rank and scale, fixed lr) and `repadapter` (per-task scale, fixed
  lr) the `final` protocol with their recipes (published numbers test-selected, as Convpass's);
  `adapter_houlsby`, `adaptformer`, `bitfit`, `ssf`, `ln_tune`, `difffit`, `lora_adapter` PETL_Vision's val-tuned grid (AdamW lr {1e-2, 1e-3}
  × weight decay {1e-4, 1e-3} at batch 64; its per-task search over method sizes is not rerun), the only
  published protocol of theirs the spec pins down; the `peft` tuners have no published numbers, so
  the same grid on val200 with the suite's seeds, and `compare` lists them as unreported.

- VPT's own baselines: `partial_1` full fine-tuning's grid, `mlp_3` and `sidetune` the linear probe's (VPT ran
  them through the same tuning script). `sct`, `gps`, `spt_lora`, `spt_adapter` and `noah`: the `final` protocol
  with the fixed per-task recipes of their official scripts, after the method's own selection or search stage
  (`docs/methods/selection.md`); their published numbers come from compilations whose selection is unknown.

`--budget quick` keeps one seed (42) and a 2 × 1 grid (and, for E²VPT, 3 × 2 pruning levels); every
result records the budget, so the leaderboard and `compare` label it. Known gap: VPT-shallow's prompt
length is not searched (the spec's suite choice is {1, 5, 10, 50, 100, 200} on val200); the runner's grid
covers lr × weight decay only, so VPT-shallow uses the per-task lengths of its config.

FGVC (`docs/data.md`, VPT's `tune_fgvc.py`; `FGVC_PROTOCOLS`): the prompt methods (`vpt_shallow`,
`vpt_deep`, `e2vpt`) search base lrs {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1} × weight decay {0.01, 0.001,
0.0001, 0}, `linear` its own lr grid (VTAB's, with 0.05), `full` {5e-3, 1e-3, 5e-4, 1e-4} (all per 256 images);
the other methods keep their VTAB-1k protocol. Tuning trains on `train` and selects on `val`, final runs train
on `train` again and test once after the last epoch (`tasks.suites.FGVC`); seeds and budgets as VTAB-1k's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from benchmark.core.errors import UserError
from benchmark.papers.reference import REPORTED_EPOCHS, ReferenceTable
from benchmark.report.format import protocol_label
from benchmark.run.resolve import resolve_config
from benchmark.run.splits import mode_splits, protocol_splits
from methods import MethodConfig
from tasks import DEFAULT_SUITE, Task, get_suite

PAPER_SEEDS = (42, 44, 82, 100, 800)
QUICK_SEEDS = (42,)
# The specs' grids: base learning rates per 256 images (scaled by batch/256 per task) and weight decays.
VPT_BASE_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_WDS = (0.01, 1e-3, 1e-4, 0.0)
FULL_BASE_LRS = (0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 5e-4, 1e-4)
# The quick budget's 2 × 1 grids: two base lrs of the full grid (around the spec's confirmed per-task
# values) and one weight decay.
VPT_QUICK = ((25.0, 1.0), (1e-3,))
FULL_QUICK = ((0.01, 0.001), (1e-4,))
# One single-seed 19-task sweep of 100 epochs on train800val200 (1,000 images): the unit of the perf table's estimate.
SWEEP_IMAGES = 19 * REPORTED_EPOCHS * 1000


@dataclass(frozen=True)
class PaperProtocol:
    """How a method's reported numbers on a suite were produced, as the benchmark reruns it.

    Attributes:
        protocol: the runner protocol: `grid` (tune lr × weight decay on val200, then the seeds) or `final`
            (the fixed recipe, then the seeds).
        base_lrs: the grid's learning rates per 256 images (each task's lr = base × batch/256); empty for `final`.
        wds: the grid's weight decays; empty for `final`.
        quick_base_lrs: the quick budget's base learning rates.
        quick_wds: the quick budget's weight decays.
        quick_options: method options of the quick budget (e.g. fewer pruning levels).
        recipe: recipe fields the protocol sets on top of the method's (e.g. the optimiser its grid is for).
        spec: where the suite's specs describe the protocol.
    """

    protocol: str
    base_lrs: tuple[float, ...] = ()
    wds: tuple[float, ...] = ()
    quick_base_lrs: tuple[float, ...] = ()
    quick_wds: tuple[float, ...] = ()
    quick_options: dict[str, str] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    spec: str = ""


# PETL_Vision's AdamW grid (`docs/protocols.md`): lr {1e-2, 1e-3} at batch 64 (per 256: {0.04, 0.004}) ×
# weight decay {1e-4, 1e-3}; the quick budget keeps both lrs and the smaller weight decay.
PETL_BASE_LRS, PETL_WDS = (0.04, 0.004), (1e-4, 1e-3)
PETL_VISION_GRID = PaperProtocol("grid", PETL_BASE_LRS, PETL_WDS, PETL_BASE_LRS, PETL_WDS[:1],
                                 recipe={"optimizer": "adamw"}, spec="docs/protocols.md")  # fmt: skip
# Methods without published numbers: the same grid on val200, the suite's seeds (the suite's choice).
SUITE_GRID = dataclasses.replace(
    PETL_VISION_GRID, spec="docs/methods/peft_tuners.md: no published numbers; suite grid"
)

PAPER_PROTOCOLS: dict[str, PaperProtocol] = {
    "vpt_deep": PaperProtocol("grid", VPT_BASE_LRS, VPT_WDS, *VPT_QUICK, spec="docs/methods/prompts.md"),
    "vpt_shallow": PaperProtocol("grid", VPT_BASE_LRS, VPT_WDS, *VPT_QUICK, spec="docs/methods/prompts.md"),
    "e2vpt": PaperProtocol(
        "grid",
        VPT_BASE_LRS,
        VPT_WDS,
        *VPT_QUICK,
        quick_options={"max_token_levels": "3", "max_segment_levels": "2"},
        spec="docs/methods/prompts.md",
    ),
    "linear": PaperProtocol("grid", VPT_BASE_LRS, VPT_WDS, *VPT_QUICK, spec="docs/methods/baselines.md"),
    "full": PaperProtocol("grid", FULL_BASE_LRS, VPT_WDS, *FULL_QUICK, spec="docs/methods/baselines.md"),
    # VPT's own baselines: Partial-1 trains backbone weights (full's grid), Mlp-3 and Sidetune a head (linear's).
    "partial_1": PaperProtocol("grid", FULL_BASE_LRS, VPT_WDS, *FULL_QUICK, spec="docs/methods/baselines.md"),
    "mlp_3": PaperProtocol("grid", VPT_BASE_LRS, VPT_WDS, *VPT_QUICK, spec="docs/methods/baselines.md"),
    "sidetune": PaperProtocol("grid", VPT_BASE_LRS, VPT_WDS, *VPT_QUICK, spec="docs/methods/baselines.md"),
    # Fixed per-task recipes of the official scripts, each after its own selection or search stage.
    **{
        m: PaperProtocol("final", spec="docs/methods/selection.md")
        for m in ("sct", "gps", "spt_lora", "spt_adapter", "noah")
    },
    "convpass": PaperProtocol("final", spec="docs/methods/adapters.md"),
    "convpass_attn": PaperProtocol("final", spec="docs/methods/adapters.md"),
    "lora": PaperProtocol("final", spec="docs/methods/reparameterisation.md"),
    "adapter": PaperProtocol("final", spec="docs/methods/adapters.md"),
    "fact_tt": PaperProtocol("final", spec="docs/methods/reparameterisation.md"),
    "fact_tk": PaperProtocol("final", spec="docs/methods/reparameterisation.md"),
    "repadapter": PaperProtocol("final", spec="docs/methods/reparameterisation.md"),
    **{
        m: PETL_VISION_GRID
        for m in ("adapter_houlsby", "adaptformer", "bitfit", "ssf", "ln_tune", "difffit", "lora_adapter")
    },
    **{
        m: SUITE_GRID
        for m in ("peft", *(f"peft_{t}" for t in ("lora", "dora", "vera", "ia3", "boft", "oft", "loha", "lokr")))
    },
}
# FGVC's grids (`docs/data.md`), where they differ from VTAB-1k's; the quick budget keeps two base lrs of
# each grid and one weight decay, as on VTAB-1k.
VPT_FGVC_BASE_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1)
LINEAR_FGVC_BASE_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
FULL_FGVC_BASE_LRS = (5e-3, 1e-3, 5e-4, 1e-4)
FGVC_SPEC = "docs/data.md"
FGVC_PROTOCOLS: dict[str, PaperProtocol] = {
    **{m: dataclasses.replace(PAPER_PROTOCOLS[m], base_lrs=VPT_FGVC_BASE_LRS, spec=FGVC_SPEC)
       for m in ("vpt_shallow", "vpt_deep", "e2vpt")},
    "linear": dataclasses.replace(PAPER_PROTOCOLS["linear"], base_lrs=LINEAR_FGVC_BASE_LRS, spec=FGVC_SPEC),
    "full": PaperProtocol("grid", FULL_FGVC_BASE_LRS, VPT_WDS, (1e-3, 1e-4), (1e-4,), spec=FGVC_SPEC),
}  # fmt: skip
SUITE_PROTOCOLS: dict[str, dict[str, PaperProtocol]] = {"fgvc": FGVC_PROTOCOLS}


def suite_protocol(method: str, suite: str) -> PaperProtocol:
    """The protocol `method` is reproduced with on `suite`: the suite's own where it has one, else VTAB-1k's."""
    return SUITE_PROTOCOLS.get(suite, {}).get(method, PAPER_PROTOCOLS[method])


@dataclass(frozen=True)
class TaskPlan:
    """One task of a reproduction: its resolved config, grid, seeds and what it costs.

    Attributes:
        task: the task.
        config: the method's config for the task, with the plan's options and recipe overrides.
        overrides: the recipe overrides the sweep applies to this task (the grid, an epoch count).
        seeds: the final runs' seeds.
        grid_runs: tuning runs of the lr × weight-decay grid (0 for `final`).
        dense_runs: a pruning method's dense run (0 or 1).
        rewind_runs: a pruning search's rewind runs.
        frozen_features: the method trains a head on features computed once per split (the linear probe).
    """

    task: Task
    config: MethodConfig
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    grid_runs: int
    dense_runs: int
    rewind_runs: int
    frozen_features: bool

    @property
    def runs(self) -> int:
        return self.grid_runs + self.dense_runs + self.rewind_runs + len(self.seeds)

    def sizes(self, mode: str) -> tuple[int, int]:
        """Images of the (train, evaluation) splits of `mode` on this task."""
        train, evaluate = mode_splits(self.task, mode)
        return self.task.split_sizes[train], self.task.split_sizes[evaluate]

    @property
    def train_images(self) -> int:
        """Images passed forward and backward in training (the dense run at its own epochs, e.g. NOAH's supernet),
        plus the pruning or selection decision's pass over the tuning split."""
        if self.frozen_features:
            return 0
        epochs, dense_epochs = self.config.recipe.epochs, self.config.dense_config().recipe.epochs
        tune = self.sizes("tune")[0]
        return ((self.grid_runs + self.rewind_runs) * tune * epochs + self.dense_runs * tune * dense_epochs
                + len(self.seeds) * self.sizes("final")[0] * epochs + int(self.config.prunes) * tune)  # fmt: skip

    @property
    def eval_images(self) -> int:
        """Images passed forward only: the validation split after each tuning run, the test split after each
        final run.

        For frozen features: one pass over each split to compute them (head training on them is negligible).
        """
        if self.frozen_features:
            return sum(self.task.split_sizes[s] for s in protocol_splits(self.task, "grid"))
        val, test = self.sizes("tune")[1], self.sizes("final")[1]
        return (self.grid_runs + self.dense_runs + self.rewind_runs) * val + len(self.seeds) * test


@dataclass(frozen=True)
class Plan:
    """A reproduction of one method: the protocol, the budget, and every task's plan."""

    method: str
    budget: str
    protocol: PaperProtocol
    options: dict[str, str]
    tasks: list[TaskPlan]

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.tasks[0].seeds if self.tasks else ()

    def task_overrides(self) -> dict[str, dict[str, Any]]:
        return {tp.task.id: tp.overrides for tp in self.tasks}

    def label(self) -> str:
        """The protocol label its results will carry (`leaderboard.protocol_label`)."""
        return protocol_label(self.protocol.protocol, len(self.seeds), self.budget)

    def frame(self) -> pd.DataFrame:
        """One row per task: grid, seeds, runs by kind, training and evaluation images."""
        rows = []
        for tp in self.tasks:
            r = tp.config.recipe
            rows.append({
                "task": tp.task.id,
                "batch": r.batch_size,
                "epochs": r.epochs,
                "grid": f"{len(r.lr_grid)}×{len(r.wd_grid)}" if tp.grid_runs else "fixed",
                "lrs": ", ".join(f"{x:g}" for x in r.lr_grid) if tp.grid_runs else f"{r.lr:g}",
                "wds": ", ".join(f"{x:g}" for x in r.wd_grid) if tp.grid_runs else f"{r.weight_decay:g}",
                "seeds": len(tp.seeds),
                "grid runs": tp.grid_runs,
                "pruning runs": tp.dense_runs + tp.rewind_runs,
                "runs": tp.runs,
                "train images": tp.train_images,
                "eval images": tp.eval_images,
            })  # fmt: skip
        return pd.DataFrame(rows)

    def describe(self) -> str:
        """The plan as text: what runs, per task, and the totals."""
        frame = self.frame()
        train, evaluate = int(frame["train images"].sum()), int(frame["eval images"].sum())
        p = self.protocol
        seeds = ("seeds " if len(self.seeds) > 1 else "seed ") + ", ".join(map(str, self.seeds))
        suite = self.tasks[0].task.suite_info if self.tasks else None
        (tune, val), (final, test) = (
            (suite.tune, suite.final) if suite else (("train800", "val200"), ("train800val200", "test"))
        )
        if p.protocol == "grid":
            how = (f"grid protocol: each lr × weight-decay point on {tune} → {val} (seed 42), then the best "
                   f"pair with {seeds} on {final} → {test}, last epoch")  # fmt: skip
        else:
            how = (f"final protocol: the paper's fixed recipe with {seeds} on {final} → {test}, last epoch "
                   "(the paper selected on test; the suite does not)")  # fmt: skip
        unit = "" if suite is None or suite.id == DEFAULT_SUITE else "VTAB-1k "
        lines = [
            f"{self.method}, {self.budget} budget ({p.spec}): {how}; label {self.label()}",
            *([f"options: {', '.join(f'{k}={v}' for k, v in self.options.items())}"] if self.options else []),
            "",
            frame.to_string(index=False),
            "",
            f"total: {int(frame.runs.sum())} runs; {train:,} training images (forward + backward) and {evaluate:,} "
            f"evaluation images; training ≈ {train / SWEEP_IMAGES:.1f}× one single-seed 19-task {unit}sweep "
            f"(100 epochs on 1,000 images per task)",
        ]
        if any(tp.frozen_features for tp in self.tasks):
            lines.append("frozen features: the head trains on features computed once per split, so the cost is the "
                         "evaluation images (one forward pass over each split); the runs themselves take seconds")  # fmt: skip
        return "\n".join(lines)


def reproducible_methods(reference: ReferenceTable) -> list[str]:
    """Registered methods with a protocol: their paper's (reported numbers to compare with), or the suite's grid
    where nothing is published (`compare` then lists them as unreported)."""
    import methods

    return sorted(m for m in methods.list_methods() if m in PAPER_PROTOCOLS)


def plan_reproduction(
    config: MethodConfig,
    budget: str,
    tasks: list[Task],
    reference: ReferenceTable,
    *,
    epochs: int | None = None,
    cache_features: bool = True,
) -> Plan:
    """The runs that reproduce `config`'s method under `budget` on `tasks`.

    Args:
        config: the method's default config (per-task settings are applied per task).
        budget: `full` or `quick`.
        tasks: the tasks to run.
        reference: the VTAB-1k reference table (only the list of reproducible methods comes from it; a suite's
            protocol does not need reported rows).
        epochs: an epoch count other than the paper's, recorded in every result (and marked by `compare`).
        cache_features: frozen-feature methods train on features computed once (the runner's default).

    Raises:
        UserError: a method without reported numbers, or an unknown budget.
    """
    name = config.name
    suites = {t.suite for t in tasks}
    if len(suites) > 1:
        raise UserError(f"a reproduction runs on one suite; the tasks belong to {', '.join(sorted(suites))}")
    suite = get_suite(suites.pop() if suites else DEFAULT_SUITE)
    if name not in reproducible_methods(reference):
        raise UserError(f"{name} has no published {suite.title} protocol to reproduce; methods with one: "
                        f"{', '.join(reproducible_methods(reference))}")  # fmt: skip
    if budget not in ("full", "quick"):
        raise UserError(f"unknown budget {budget!r}; pick full or quick")
    protocol = suite_protocol(name, suite.id)
    quick = budget == "quick"
    options = dict(protocol.quick_options) if quick else {}
    seeds = QUICK_SEEDS if quick else PAPER_SEEDS
    base_lrs, wds = (protocol.quick_base_lrs, protocol.quick_wds) if quick else (protocol.base_lrs, protocol.wds)
    plans = []
    for task in tasks:
        overrides: dict[str, Any] = {**protocol.recipe, **({"epochs": epochs} if epochs else {})}
        if protocol.protocol == "grid":
            # Base lrs are per 256 images: the spec's lr for this task's batch size.
            batch_size = resolve_config(config, task.id, options, task_recipe=overrides).recipe.batch_size
            overrides["lr_grid"] = tuple(b * batch_size / 256 for b in base_lrs)
            overrides["wd_grid"] = tuple(wds)
        # What the sweep trains: the same resolution, with these overrides as the task's (`Plan.task_overrides`).
        cfg = resolve_config(config, task.id, options, task_recipe=overrides)
        grid_runs = len(cfg.recipe.lr_grid) * len(cfg.recipe.wd_grid) if protocol.protocol == "grid" else 0
        rewinds = 0
        if cfg.prunes and hasattr(cfg, "levels"):
            token_levels, segment_levels = cfg.levels()
            pairs = len(token_levels) * len(segment_levels)
            rewinds = pairs if pairs > 1 else 0  # a single candidate is taken without a search
        # Features are computed once only without augmentation (`runner.execute`): random crops train on images.
        frozen = (
            cache_features
            and task.suite_info.augment == "none"
            and bool(getattr(getattr(cfg, "model_cls", None), "features_frozen", False))
        )
        plans.append(TaskPlan(task, cfg, overrides, seeds, grid_runs, int(cfg.trains_dense), rewinds, frozen))
    return Plan(name, budget, protocol, options, plans)
