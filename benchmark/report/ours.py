"""Our side of a comparison with the papers: the runs that report test accuracy, which checkpoint each used and
which reference backbone's rows they are compared with (`benchmark.papers.backbones`), and the variants of a method
(protocol, budget, configuration, reference backbone) with their numbers aggregated per suite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from benchmark.papers.backbones import backbone_identity, run_backbone
from benchmark.report.format import SUITE_OF, protocol_label
from benchmark.report.leaderboard import aggregate, runs_frame
from tasks import SUITES


def ours_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run that reports test accuracy (`final` mode): the leaderboard's run columns plus
    `epochs`, `weights_id`, `backbone_text`, `reference_backbone` (the reference backbone id whose rows the run is
    compared with; empty when none), `grid` (the lr × weight-decay grid's shape) and `search` (a pruning search's
    token × segment levels)."""
    records = [r for r in records if r.get("mode") == "final"]
    frame = runs_frame(records)
    extra = []
    for r in records:
        config = r.get("config") or {}
        weights_id, text = backbone_identity(config)
        grid = (r.get("selection") or {}).get("grid")
        pruning = r.get("pruning") or {}
        levels = (pruning.get("token_levels"), pruning.get("segment_levels"))
        extra.append({
            "epochs": ((config.get("method_config") or {}).get("recipe") or {}).get("epochs"),
            "weights_id": weights_id,
            "backbone_text": text,
            "reference_backbone": run_backbone(config) or "",
            "grid": (len({g[0] for g in grid}), len({g[1] for g in grid})) if grid else None,
            "search": (len(levels[0]), len(levels[1])) if all(levels) else None,
        })  # fmt: skip
    frame["suite"] = [SUITE_OF.get(r["task"], "vtab1k") for r in records]
    return pd.concat([frame, pd.DataFrame(extra, index=frame.index)], axis=1) if records else frame


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


@dataclass
class Variant:
    """Our runs of one method under one protocol and budget."""

    method: str
    protocol: str
    budget: str
    runs: pd.DataFrame
    stats: dict[str, Any]
    # What sets this configuration apart from the method's other runs under the protocol (`benchmark.report.variants`).
    variant: str = ""
    suite: str = "vtab1k"
    # The reference backbone id whose rows these runs are compared with (`backbones.run_backbone`); "" when none.
    backbone: str = "vit_b16_in21k"

    def label(self) -> str:
        """The protocol label of the whole variant (seeds: those with a successful run)."""
        seeds = self.runs[self.runs.status == "ok"].seed.nunique()
        label = protocol_label(self.protocol, int(seeds), self.budget)
        return label + (f" [{self.variant}]" if self.variant else "")

    def describe(self) -> str:
        """How these numbers were produced, in words: tuning, seeds, epochs, search, budget."""
        ok = self.runs[self.runs.status == "ok"]
        seeds = sorted(int(s) for s in ok.seed.unique())
        epochs = sorted({int(e) for e in self.runs.epochs.dropna()})
        ep = "/".join(map(str, epochs)) or "?"
        suite = SUITES[self.suite]
        if self.protocol == "grid":
            grids = sorted({g for g in self.runs.grid.dropna()})
            shape = " or ".join(f"{a}×{b}" for a, b in grids) or "?"
            text = f"val-tuned: lr × weight-decay grid {shape} on {' → '.join(suite.tune)} (seed 42), then "
        else:
            text = "fixed recipe (no tuning): "
        text += f"{' → '.join(suite.final)}, last epoch of {ep}, {_seeds(len(seeds))} ({', '.join(map(str, seeds))})"
        searches = sorted({s for s in self.runs.search.dropna()})
        if searches:
            text += "; pruning search over " + " or ".join(f"{a}×{b}" for a, b in searches) + " token × segment levels"
        if self.budget != "full":
            text += f"; {self.budget} budget"
        return text


def method_variants(frame: pd.DataFrame, method: str, suite: str = "vtab1k") -> list[Variant]:
    """The variants of `method`'s runs on `suite`'s tasks (`ours_frame`), each aggregated over that suite only; runs
    compared with different reference backbones are never one variant."""
    out = []
    runs = frame[(frame.method == method) & (frame.suite == suite)] if "suite" in frame else frame.iloc[0:0]
    if runs.empty:
        return out
    keys = ["protocol", "budget", "variant", "reference_backbone"]
    for (protocol, budget, variant, backbone), g in runs.groupby(keys, sort=True):
        ok = g[g.status == "ok"]
        per_seed = ok.pivot_table(index="seed", columns="task", values="acc", aggfunc="mean")
        out.append(Variant(method, protocol, budget, g, aggregate(per_seed, suite), variant, suite, backbone))
    return out
