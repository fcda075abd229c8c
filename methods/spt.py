"""SPT: sensitivity-aware visual parameter-efficient fine-tuning (SPT-LoRA and SPT-Adapter).

He, Cai, Zhang, Tao, Zhuang, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023 (oral),
https://arxiv.org/abs/2303.08566; official code ziplab/SPT e385f67 (`engine.py: get_sensitivity`,
`train_spt.py`, `model/vision_transformer_timm.py: VisionTransformerSPT`, `configs/vtab_supervised_spt_*.sh`).

Stage 1, the decision (the suite's pruning stage, `decides_from = "pretrained"`: made once per task on the
freshly built model from train800, before the grid; every run of the task carries it):
- sensitivity of every candidate weight: the squared gradient g² of the cross-entropy loss, summed over
  16 batches of 32 images (512 images; `sensitivity_images`, `sensitivity_batch`), with the model in
  training mode (drop-path 0.1 acting) and a random, untrained head (truncated-normal std 0.02) — the code's
  `grad_dict[name] += param.grad ** 2` (the paper's first-order Taylor term with Δw = −g, not |g·w|);
- candidates: per block the matrices q, k, v (row blocks of timm's fused qkv, which the code keeps as three
  Linears), proj, fc1, fc2, and the vectors: their biases (q, k, v separately) and the LayerNorm scales and
  shifts (the final norm included); the patch embedding, position embedding, class token and head are not;
- allotment: the top-τ most sensitive weights; a matrix holding at least cost/α of them (cost: its LoRA's
  r·(in + out) or its adapter's 2·out·r + r + out; α = 10) gets that module instead (structured tuning) and
  none of its entries; with `structured_vectors` (the code's `--structured_vector`, set in every script) a
  vector holding at least len/β of them (β = 5) is tuned whole; the other selected entries are tuned
  unstructured (a delta on those entries only). Tunable = D (the class token, always tuned, as the code's
  `ft_cls_token`) + Σ structured costs + unstructured entries + whole vectors. The code sweeps τ on a 0.02 M
  grid and keeps the total closest to each budget (above or below); here τ is the largest whose total does
  not exceed `budget` (the total grows with τ, so a bisection finds it): the budget is never exceeded.
Stage 2, training: the frozen backbone, each structured matrix with its module, each unstructured entry a
delta added to the frozen weight in the forward (`SparseDelta`; `SPTLinear`, or `SparselyTuned` on a
LayerNorm), the class token a delta.
- LoRA (`BlockSPTParallel`): Δy = DropPath₀.₁(B A Dropout₀.₁(x)), beside q, k, v (one dropout mask of the
  input shared by the three), fc1 and fc2; beside proj without the dropout. A kaiming-uniform(a=√5), B zero,
  no scale (the suite's `LoRA` at scale 1).
- Adapter (`BlockSPTSeq`): on q, k, v, fc1, fc2 in sequence with the output y ← y + DropPath₀.₁(Ad(Dropout₀.₁(y)))
  (fc1's adapter is 4D wide); on proj in parallel, reading its input, without the dropout;
  Ad = up(GELU(down(·))) with biases (the suite's `Bottleneck`: down kaiming-uniform with nn.Linear's default
  bias, up and its bias zero).
Both start at the pretrained function (`identity_at_init`).

Choices where the paper and code are silent or inconsistent:
- `budget` in millions of tunable parameters (head excluded, class token included), 0.4 by default; the README
  sweeps 0.2–1.0 M per task and keeps the best on test, which the suite does not do (`--set budget=...`).
- The released SPT-Adapter script reads the LoRA sensitivity files (`sensitivity_spt_supervised_lora_a10`), i.e.
  decisions made with LoRA's costs; here each method decides with its own module's cost.
- The code counts unstructured LayerNorm entries in the budget but never trains them (its sparse layer
  replaces Linears only); here they are trained (a delta on the norm's scale or shift).
- Without a decision (contract tests, `--set` runs outside the sweep) the model gets a deterministic default
  spending exactly the budget: modules on the eligible matrices in order while their cost fits, then the rest
  as the first unstructured entries of the remaining matrices and vectors. Its count is the formula
  (`expected_params`: budget·10⁶ exactly, 400,000 on ViT-B/16 at 0.4); a decided model reports
  D + Σ structured costs + entries (`decision_params`), at most the budget.
- The budget is refused above what SPT can tune on the backbone (τ = every candidate: every eligible matrix
  structured, every vector whole: 1,449,216 for SPT-LoRA-8 and 1,532,736 for SPT-Adapter-8 on ViT-B/16), and
  below the class token.

Recipe (the scripts): AdamW lr 1e-3, weight decay 1e-4 (1-D tensors and the class token without), batch 64
without drop_last, 100 epochs, timm cosine warm-up 10 from 1e-6 to 1e-5, drop-path 0.1, no augmentation;
the code reported the best of its test evaluations, the suite the last epoch. Grid: PETL_Vision's lr × wd.

Layout: this file holds the modules (`ClassTokenDelta`, `SPTLinear`), the model (`SPTModel`) and the two
registered configs; the decision stage (candidates, sensitivity, allotment, default decision) is
`methods/_spt_allot.py`; the unstructured deltas and the frozen-layer wrapper are `methods/_sparse.py` (shared with
GPS).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, PruneCandidate, Recipe, TunableModule
from methods._bottleneck import Bottleneck
from methods._family import Backbone, backbone_report
from methods._inject import Wrapped, replace_module
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._sparse import SparseDelta, SparselyTuned
from methods._spt_allot import (
    MATRICES,
    SENSITIVITY_MODES,
    Allotter,
    Piece,
    candidate_pieces,
    default_allotment,
    module_cost,
    sensitivity,
)
from methods.lora import LoRA


# -- modules ----------------------------------------------------------------------------------------------------
class ClassTokenDelta(TunableModule):
    """A delta on the class token, added to sequence position 0 after the position embedding (before `norm_pre`):
    the same as tuning the class token itself when the position dropout is off."""

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[:, :1] + self.delta.to(x.dtype), x[:, 1:]], dim=1)


class SPTLinear(SparselyTuned):
    """A frozen Linear with `SparseDelta`s on its weight/bias and structured modules on row slices of its output.

    `branches[k]` acts on output slice `slices[k]` (rows [a, b)): kind `lora` reads the (dropped-out) input and
    adds DropPath(B A x) to the slice; `adapter` adds DropPath(Ad(dropout(slice))) to the slice (`reads_input`:
    Ad of the input instead, without the dropout: the code's proj adapter).
    """

    def __init__(self, linear: nn.Linear, deltas: dict[str, SparseDelta], kind: str,
                 branches: list[tuple[tuple[int, int], nn.Module]], *, dropout: float, drop_path: float,
                 reads_input: bool = False) -> None:  # fmt: skip
        super().__init__(linear, deltas)
        self.kind = kind
        self.slices = [s for s, _ in branches]
        self.branches = nn.ModuleList([m for _, m in branches])
        self.drop_paths = nn.ModuleList([DropPath(drop_path) if drop_path > 0 else nn.Identity() for _ in branches])
        self.dropout = nn.Dropout(dropout)
        self.reads_input = reads_input
        cuts = sorted({0, linear.out_features, *(a for a, _ in self.slices), *(b for _, b in self.slices)})
        self.sizes = [b - a for a, b in itertools.pairwise(cuts)]
        self.part = [cuts.index(a) for a, _ in self.slices]  # which part of the split output each branch acts on

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if not self.slices:
            return y
        parts = list(y.split(self.sizes, dim=-1))
        x_in = self.dropout(x) if self.kind == "lora" else x
        for k, branch, drop_path in zip(self.part, self.branches, self.drop_paths, strict=True):
            sequential = self.kind == "adapter" and not self.reads_input
            delta = branch(self.dropout(parts[k])) if sequential else branch(x_in)
            parts[k] = parts[k] + drop_path(delta)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class SPTModel(PeftModel):
    """The frozen ViT with the class-token delta and, per the decision, modules and deltas on its Linears/norms."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: SPTConfigBase) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.config = config
        self.pieces = candidate_pieces(backbone)
        self.originals: dict[str, nn.Module] = {p.path: backbone.get_submodule(p.path) for p in self.pieces}
        self.allotter = config.allotter(backbone)
        if config.tune_cls_token and backbone.cls_token is not None:
            self.cls_delta = ClassTokenDelta(backbone.embed_dim, backbone.cls_token.device)
            replace_module(backbone, "norm_pre", Wrapped(backbone.norm_pre, before=self.cls_delta))
        default = default_allotment(self.allotter, config.budget_params)
        self.install({"structured": default.structured.to(torch.uint8), "entries": default.entries})

    def install(self, state: dict[str, Tensor]) -> None:
        """Put the decision's modules in place of the current ones (the frozen modules are kept)."""
        structured, entries = self.check_decision(state)
        for path, module in self.originals.items():
            replace_module(self.backbone, path, module)
        cfg = self.config
        matrices = [p for p in self.pieces if p.op is not None]
        branches: dict[str, list[tuple[tuple[int, int], nn.Module]]] = {}
        for piece, on in zip(matrices, structured.tolist(), strict=True):
            if on:
                branches.setdefault(piece.path, []).append(
                    ((piece.row0, piece.row0 + piece.out_features), self.structured_module(piece))
                )
        indices: dict[tuple[str, str], list[Tensor]] = {}
        piece_of = torch.searchsorted(self.allotter.offsets, entries, right=True) - 1
        for i in piece_of.unique().tolist():
            p = self.pieces[i]
            local = entries[piece_of == i] - int(self.allotter.offsets[i]) + p.start
            indices.setdefault((p.path, p.attr), []).append(local)
        for path, original in self.originals.items():
            device = next(original.parameters()).device
            deltas = {
                attr: SparseDelta(torch.cat(idx).to(device)) for (pth, attr), idx in indices.items() if pth == path
            }
            if isinstance(original, nn.LayerNorm):
                if deltas:
                    replace_module(self.backbone, path, SparselyTuned(original, deltas))
            elif deltas or path in branches:
                kind, reads_input = cfg.structured, path.endswith("attn.proj")
                dropout = 0.0 if reads_input else cfg.branch_dropout
                module = SPTLinear(original, deltas, kind, branches.get(path, []), dropout=dropout,
                                   drop_path=cfg.branch_drop_path, reads_input=reads_input and kind == "adapter")  # fmt: skip
                replace_module(self.backbone, path, module)

    def structured_module(self, piece: Piece) -> nn.Module:
        cfg, device = self.config, self.originals[piece.path].weight.device
        if cfg.structured == "lora":
            return LoRA(piece.in_features, piece.out_features, cfg.rank, scale=1.0, dropout=0.0).to(device)
        adapter = Bottleneck(piece.out_features, cfg.rank, act=nn.GELU(), dropout=0.0, init="lora").to(device)
        bound = 1 / math.sqrt(piece.out_features)  # nn.Linear's default bias, which the code leaves on `down`
        if device.type != "meta":
            nn.init.uniform_(adapter.down.bias, -bound, bound)
        return adapter

    def check_decision(self, state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(structured flags, entries) of a decision, checked against this model's candidates (ValueError)."""
        if set(state) != {"structured", "entries"}:
            raise ValueError(f"an SPT decision holds `structured` and `entries`, got {sorted(state)}")
        structured, entries = state["structured"].cpu().bool(), state["entries"].cpu().long()
        matrices = [i for i, p in enumerate(self.pieces) if p.op is not None]
        if structured.shape != (len(matrices),):
            raise ValueError(f"the decision flags {structured.numel()} matrices, the model has {len(matrices)}")
        total = int(self.allotter.sizes.sum())
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= total):
            raise ValueError(f"decision entries outside [0, {total})")
        if entries.numel() != entries.unique().numel():
            raise ValueError("decision entries repeat")
        piece_of = torch.searchsorted(self.allotter.offsets, entries, right=True) - 1
        on = torch.zeros(len(self.pieces), dtype=torch.bool)
        on[torch.tensor(matrices, dtype=torch.long)] = structured
        if bool(on[piece_of].any()):
            raise ValueError("decision entries fall in matrices tuned by a structured module")
        return structured, entries

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        self.install(state)
        self.mark_trainable()

    def frozen_tensor(self, piece: Piece) -> Tensor:
        return getattr(self.originals[piece.path], piece.attr)

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)


def decision_params(config: SPTConfigBase, backbone: VisionTransformer, state: dict[str, Tensor]) -> int:
    """Tunable parameters of a decided model: D (class token) + Σ costs of the structured matrices + entries."""
    allotter = config.allotter(backbone)
    costs = allotter.cost[allotter.matrix]
    return allotter.fixed + int(costs[state["structured"].bool()].sum()) + state["entries"].numel()


# -- configs ----------------------------------------------------------------------------------------------------
@dataclass
class SPTConfigBase(MethodConfig):
    """SPT settings (defaults: the official scripts).

    Attributes:
        budget: tunable parameters in millions (head excluded, class token included); the README sweeps 0.2–1.0.
        rank: LoRA rank or adapter bottleneck (`--low_rank_dim`, 8).
        alpha: a matrix gets its module when it holds at least cost/alpha of the top-τ weights (10).
        beta: a vector is tuned whole when it holds at least len/beta of them (5; with `structured_vectors`).
        structured_vectors: tune such vectors whole (the code's `--structured_vector`, in every script).
        tune_cls_token: tune the class token (the code always does; counted in the budget).
        sensitivity_images: images whose gradients are summed (16 batches of 32 in the code); None: all of train800.
        sensitivity_batch: images per gradient (32, the sensitivity scripts' batch).
        sensitivity_mode: `train` (the code: drop-path acting) or `eval`.
        branch_dropout: dropout on a module's input (0.1; none on proj's).
        branch_drop_path: drop-path on each module's output (0.1).
        drop_path_rate: the backbone's stochastic depth (0.1).
        head_init: `trunc_normal` (the code's timm init), `torch` or `vpt`.
    """

    category: ClassVar[str] = "selection"
    decides_from: ClassVar[str] = "pretrained"
    needs: ClassVar[str] = (
        "ViT blocks with fused qkv, proj, fc1 and fc2 Linears (timm's VisionTransformer; the official code's Swin "
        "release never came)"
    )
    identity_at_init: ClassVar[bool] = True
    structured: ClassVar[str]

    recipe: Recipe = field(default_factory=lambda: petl_recipe(drop_last=False))
    budget: float = 0.4
    rank: int = 8
    alpha: float = 10.0
    beta: float = 5.0
    structured_vectors: bool = True
    tune_cls_token: bool = True
    sensitivity_images: int | None = 512
    sensitivity_batch: int = 32
    sensitivity_mode: str = "train"
    branch_dropout: float = 0.1
    branch_drop_path: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "trunc_normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"sensitivity_mode": SENSITIVITY_MODES, "head_init": HEAD_INITS})
        _checks.real(self, "budget", 0.0, low_open=True)
        _checks.integer(self, "rank", 1)
        _checks.real(self, "alpha", 0.0, low_open=True)
        _checks.real(self, "beta", 0.0, low_open=True)
        _checks.integer(self, "sensitivity_images", 1, none_ok=True)
        _checks.integer(self, "sensitivity_batch", 1)
        _checks.rates(self, "branch_dropout", "branch_drop_path", "drop_path_rate")

    @property
    def budget_params(self) -> int:
        return round(self.budget * 1e6)

    @property
    def prunes(self) -> bool:
        return True

    def allotter(self, backbone: VisionTransformer) -> Allotter:
        pieces = candidate_pieces(backbone)
        costs = [module_cost(self.structured, self.rank, p) if p.op else None for p in pieces]
        fixed = backbone.embed_dim if self.tune_cls_token and backbone.cls_token is not None else 0
        return Allotter(pieces, costs, self.alpha, self.beta, self.structured_vectors, fixed)

    def check_backbone(self, backbone: Backbone) -> None:
        for i, block in enumerate(backbone.blocks):
            parts = {"attn.qkv": block.attn.qkv, "attn.proj": block.attn.proj, "mlp.fc1": block.mlp.fc1,
                     "mlp.fc2": block.mlp.fc2}  # fmt: skip
            for name, m in parts.items():
                if not isinstance(m, nn.Linear) or (name == "attn.qkv" and m.out_features != 3 * backbone.embed_dim):
                    raise ValueError(
                        f"{self.name} needs timm's Linear {name} (qkv fused, 3·D wide); blocks.{i} has {m}"
                    )
        allotter = self.allotter(backbone)
        most = allotter.maximum()
        if self.budget_params > most:
            raise _checks.invalid(self, "budget", f"exceeds the {most} parameters SPT can tune on this backbone "
                                  "(every candidate weight selected)", most / 1e6)  # fmt: skip
        if self.budget_params < allotter.fixed:
            raise _checks.invalid(self, "budget", f"is below the class token's {allotter.fixed} parameters",
                                  allotter.fixed / 1e6)  # fmt: skip
        default_allotment(allotter, self.budget_params)

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    @classmethod
    def tiny(cls) -> Self:
        return cls(budget=0.002, rank=2)

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return SPTModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        # The default decision spends the budget exactly (400,000 on ViT-B/16 at budget 0.4); a decided model
        # reports `decision_params` instead (at most the budget).
        return backbone_report(backbone, num_classes, self.budget_params)

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        if not isinstance(model, SPTModel):
            raise TypeError(f"{self.name}'s decision needs an SPT model")
        scores, seen = sensitivity(model, batches, self.sensitivity_images, self.sensitivity_batch,
                                   self.sensitivity_mode)  # fmt: skip
        decision = model.allotter.allot(scores, self.budget_params)
        matrices = [p for p in model.pieces if p.op is not None]
        by_op = {op: sum(1 for p, s in zip(matrices, decision.structured.tolist(), strict=True) if s and p.op == op)
                 for op in MATRICES}  # fmt: skip
        state = {"structured": decision.structured.to(torch.uint8), "entries": decision.entries}
        info: dict[str, Any] = {
            "budget": self.budget_params,
            "tunable": decision.total,
            "top": decision.top,
            "structured_matrices": int(decision.structured.sum()),
            "structured_by_op": by_op,
            "unstructured_entries": int(decision.entries.numel()),
            "sensitivity_images": seen,
        }
        return [PruneCandidate("spt", state, info)]


@register_method("spt_lora")
@dataclass
class SPTLoRAConfig(SPTConfigBase):
    """SPT-LoRA: LoRA beside the sensitive matrices, unstructured deltas elsewhere (400,000 at budget 0.4)."""

    structured = "lora"


@register_method("spt_adapter")
@dataclass
class SPTAdapterConfig(SPTConfigBase):
    """SPT-Adapter: adapters on the sensitive matrices, unstructured deltas elsewhere (400,000 at budget 0.4)."""

    structured = "adapter"
