"""Our side of a comparison with the papers: the runs that report test accuracy, which checkpoint each used,
and the variants of a method (protocol, budget, configuration) with their numbers aggregated per suite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.papers.reference import BACKBONE_WEIGHTS
from benchmark.report.format import SUITE_OF, protocol_label
from benchmark.report.leaderboard import aggregate, runs_frame
from tasks import SUITES


def backbone_identity(config: dict[str, Any]) -> tuple[str | None, str]:
    """Which reference checkpoint a run used (`orig_in21k`, `augreg_in21k`, or None) and how to name it.

    A run matches a reference checkpoint when it ran timm's ViT-B/16 at 224 px with pretrained weights
    tagged as that checkpoint (a local `--weights` file is taken to be what the backbone name says), or
    Google's original `ViT-B_16.npz`.
    """
    name = config.get("backbone", "?")
    weights = config.get("weights")
    size = config.get("image_size")
    text = (
        name + (f" ({Path(weights).name})" if weights else "") + (f" at {size} px" if size not in (None, 224) else "")
    )
    if not config.get("pretrained", True):
        return None, f"{name} (random init)"
    arch, _, tag = name.partition(".")
    if arch != "vit_base_patch16_224" or size not in (None, 224):
        return None, text
    if weights and Path(weights).name == "ViT-B_16.npz":
        return "orig_in21k", text
    return (tag if tag in BACKBONE_WEIGHTS else None), text


def ours_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run that reports test accuracy (`final` mode): the leaderboard's run columns plus
    `epochs`, `weights_id`, `backbone_text`, `grid` (the lr × weight-decay grid's shape) and `search`
    (a pruning search's token × segment levels)."""
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
    """The variants of `method`'s runs on `suite`'s tasks (`ours_frame`), each aggregated over that suite only."""
    out = []
    runs = frame[(frame.method == method) & (frame.suite == suite)] if "suite" in frame else frame.iloc[0:0]
    for (protocol, budget, variant), g in runs.groupby(["protocol", "budget", "variant"], sort=True):
        ok = g[g.status == "ok"]
        per_seed = ok.pivot_table(index="seed", columns="task", values="acc", aggfunc="mean")
        out.append(Variant(method, protocol, budget, g, aggregate(per_seed, suite), variant, suite))
    return out
