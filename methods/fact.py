"""FacT: the weight increments of every block, tensor-factorised with factors shared across the whole ViT.

Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023,
https://arxiv.org/abs/2212.03145; official code JieShibo/PETL-ViT 026e4f1 (`FacT/fact_tt.py`,
`FacT/fact_tk.py`, `FacT/configs/{tt,tk}/<task>.yaml`).

Global U: D → r (PyTorch's Linear init) and V: r → D (zero init), shared by every block and weight. Each of
the six weights of a block (q, k, v, proj, fc1, fc2) gets an increment applied as a branch beside the
frozen Linear, on the same input: s · V dropout(U(x) Σ) (z Σ: a row vector times an r × r core). fc1
(D → kD, k = MLP ratio, 4 on ViT-B) maps U(x) to kr, split into k groups of r, each through V; fc2 views
its kD input as k chunks of D, each through U, concatenated to kr, then to r and through V.
- FacT-TT: per block Σ_q, Σ_k, Σ_v, Σ_o (r × r), Σ_fc1 (r × kr), Σ_fc2 (kr × r), each a Linear with
  PyTorch's init: 2Dr + L(4 + 2k)r², 1536r + 144r² on ViT-B/16.
- FacT-TK: a core C (r × r × r) and P (r × L(4 + 2k)), xavier-uniform; block ℓ's slot j uses
  Σ = C ·₃ P[:, (4 + 2k)ℓ + j] (slots: q, k, v, proj, then k for fc1 and k for fc2, as the official
  code reshapes them): 2Dr + L(4 + 2k)r + r³, 1536r + 144r + r³ on ViT-B/16.
V = 0 makes both exactly the identity at init; each increment is an explicit matrix (`delta_weight`)
and folds into its Linear (`merged_backbone`). Rank and s per task from the official configs.

Recipe (as Convpass's, same trainer): AdamW lr 1e-3, weight decay 1e-4 on every trainable tensor, batch
64 with drop_last, 100 epochs, timm cosine warm-up 10 from 1e-6 to 1e-5 stepped per epoch, drop-path 0.1,
head as timm's `reset_classifier`. The official code kept the best of ten test evaluations; the suite
reports the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import backbone_report
from methods._inject import ParallelLinear, addmm_into, replace_module
from methods._merge import merge_backbone
from methods._per_task import PerTaskSettings
from methods._petl_recipe import petl_recipe
from methods._registry import register_method

# (rank, s) per task, official configs: FacT-TT and FacT-TK.
FACT_TT_TASKS = {
    "cifar100": (8, 1), "caltech101": (16, 10), "dtd": (8, 0.01), "flowers102": (16, 1), "pets": (8, 1),
    "svhn": (16, 100), "sun397": (8, 1), "camelyon": (8, 10), "eurosat": (8, 100), "resisc45": (8, 0.1),
    "retinopathy": (8, 1), "clevr_count": (16, 1), "clevr_dist": (4, 10), "dmlab": (16, 10), "kitti": (16, 10),
    "dsprites_loc": (16, 100), "dsprites_ori": (16, 1), "smallnorb_azi": (16, 100), "smallnorb_ele": (8, 10),
}  # fmt: skip
FACT_TK_TASKS = {
    "cifar100": (32, 0.1), "caltech101": (32, 10), "dtd": (16, 0.01), "flowers102": (32, 1), "pets": (16, 10),
    "svhn": (32, 100), "sun397": (16, 1), "camelyon": (32, 10), "eurosat": (32, 100), "resisc45": (32, 10),
    "retinopathy": (16, 1), "clevr_count": (32, 10), "clevr_dist": (16, 10), "dmlab": (32, 10), "kitti": (32, 10),
    "dsprites_loc": (32, 100), "dsprites_ori": (32, 1), "smallnorb_azi": (32, 100), "smallnorb_ele": (16, 10),
}  # fmt: skip
SLOTS = ("qkv", "proj", "fc1", "fc2")


class FacTFactors(TunableModule):
    """U, V and the cores of every block; `cores(block)` gives block ℓ's right-multiplied matrices
    (z ↦ z R): R_qkv [r, 3r] (q|k|v), R_proj [r, r], R_fc1 [r, kr], R_fc2 [kr, r]."""

    def __init__(self, dim: int, depth: int, mlp_ratio: int, rank: int, *, kind: str, scale: float, dropout: float):
        super().__init__()
        self.kind, self.rank, self.ratio, self.scale = kind, rank, mlp_ratio, scale
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)
        self.dropout = nn.Dropout(dropout)
        k = mlp_ratio
        if kind == "tt":  # q, k, v, proj: r -> r; fc1: r -> kr; fc2: kr -> r (the official nn.Linear layout)
            self.sigma = nn.ModuleList(
                nn.ModuleDict({
                    "q": nn.Linear(rank, rank, bias=False), "k": nn.Linear(rank, rank, bias=False),
                    "v": nn.Linear(rank, rank, bias=False), "proj": nn.Linear(rank, rank, bias=False),
                    "fc1": nn.Linear(rank, k * rank, bias=False), "fc2": nn.Linear(k * rank, rank, bias=False),
                })
                for _ in range(depth)
            )  # fmt: skip
        elif kind == "tk":
            self.core = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank)))
            self.factor = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, depth * (4 + 2 * k))))
        else:
            raise ValueError(f"kind must be tt or tk, got {kind!r}")

    def cores(self, block: int) -> dict[str, Tensor]:
        r, k = self.rank, self.ratio
        if self.kind == "tt":
            s = self.sigma[block]
            return {
                "qkv": torch.cat([s["q"].weight.t(), s["k"].weight.t(), s["v"].weight.t()], dim=1),
                "proj": s["proj"].weight.t(),
                "fc1": s["fc1"].weight.t(),
                "fc2": s["fc2"].weight.t(),
            }
        per_block = 4 + 2 * k
        c = self.core @ self.factor[:, block * per_block : (block + 1) * per_block]  # [r, r, 4 + 2k]
        return {
            "qkv": c[:, :, :3].permute(0, 2, 1).reshape(r, 3 * r),  # [Σ_q | Σ_k | Σ_v]
            "proj": c[:, :, 3],
            "fc1": c[:, :, 4 : 4 + k].reshape(r, k * r),  # the official reshape of the k fc1 slots
            "fc2": c[:, :, 4 + k :].reshape(r, k * r).t(),
        }


class FacTBranch(nn.Module):
    """The increment of one Linear (`slot` of block `block`), computed from the shared factors.

    The factors are registered once, on the model (`FacTModel.fact`); each branch keeps a plain reference
    (not a submodule), so the shared tensors appear once in the module tree and in checkpoints.
    """

    def __init__(self, factors: FacTFactors, block: int, slot: str) -> None:
        super().__init__()
        if slot not in SLOTS:
            raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
        self.__dict__["factors"] = factors  # not a submodule: see the class docstring
        self.block, self.slot = block, slot

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """y + forward(x): V (block-diagonal over the groups) accumulating into y in one matmul."""
        f = self.factors
        core = f.cores(self.block)[self.slot]
        z = f.u(x.unflatten(-1, (f.ratio, -1))).flatten(-2) if self.slot == "fc2" else f.u(x)
        z = f.dropout(z @ core)
        v = f.v.weight
        if self.slot in ("qkv", "fc1"):
            v = torch.block_diag(*[v] * (z.shape[-1] // f.rank))
        return addmm_into(y, z, v, f.scale)

    def forward(self, x: Tensor) -> Tensor:
        f = self.factors
        core = f.cores(self.block)[self.slot]
        # fc2: [.., kD] -> k chunks of D -> U each -> [.., kr]
        z = f.u(x.unflatten(-1, (f.ratio, -1))).flatten(-2) if self.slot == "fc2" else f.u(x)
        z = f.dropout(z @ core)
        if self.slot in ("qkv", "fc1"):  # [.., n·r] -> n groups of r -> V each -> [.., n·D]
            return f.v(z.unflatten(-1, (-1, f.rank))).flatten(-2) * f.scale
        return f.v(z) * f.scale

    def delta_weight(self) -> Tensor:
        """The dense increment [out, in]: s · V Rᵀ U per group (fc1: row blocks, fc2: column blocks)."""
        f = self.factors
        core, u, v, r = f.cores(self.block)[self.slot], f.u.weight, f.v.weight, f.rank
        if self.slot == "fc2":
            return f.scale * torch.cat([v @ core[g * r : (g + 1) * r].t() @ u for g in range(f.ratio)], dim=1)
        groups = core.shape[1] // r
        return f.scale * torch.cat([v @ core[:, g * r : (g + 1) * r].t() @ u for g in range(groups)], dim=0)


class FacTModel(PeftModel):
    """qkv, proj, fc1 and fc2 of every block wrapped as `ParallelLinear`s with FacT branches."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: _FacTConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        d, depth = backbone.embed_dim, len(backbone.blocks)
        ratio = backbone.blocks[0].mlp.fc1.out_features // d
        self.fact = FacTFactors(d, depth, ratio, config.rank, kind=config.kind, scale=config.scale,
                                dropout=config.dropout)  # fmt: skip
        for i in range(depth):
            for slot, path in zip(SLOTS, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), strict=True):
                full = f"blocks.{i}.{path}"
                replace_module(
                    backbone, full, ParallelLinear(backbone.get_submodule(full), FacTBranch(self.fact, i, slot))
                )

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return []  # the official AdamW decays every trainable tensor, head included

    def merged_backbone(self) -> VisionTransformer:
        return merge_backbone(self.backbone)


@dataclass
class _FacTConfig(PerTaskSettings, MethodConfig):
    """FacT settings.

    Attributes:
        rank: r (per task in `for_task`).
        scale: s (per task in `for_task`).
        dropout: dropout on each core output.
        drop_path_rate: the backbone's stochastic depth.
        head_init: `torch` (timm's `reset_classifier`), `trunc_normal` or `vpt`.
        per_task: apply the per-task rank and s in `for_task`.
    """

    category: ClassVar[str] = "reparam"
    identity_at_init: ClassVar[bool] = True
    needs: ClassVar[str] = (
        "one width for every block: its factors U (D -> r) and V (r -> D) are shared by all blocks, "
        "while each Swin stage doubles the width"
    )
    kind: ClassVar[str]
    task_settings: ClassVar[dict[str, tuple[int, float]]]

    recipe: Recipe = field(default_factory=petl_recipe)
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "torch"
    per_task: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        _checks.integer(self, "rank", 1)
        _checks.real(self, "scale")
        _checks.rates(self, "dropout", "drop_path_rate")

    def check_backbone(self, backbone: VisionTransformer) -> None:
        d = backbone.embed_dim
        hidden = backbone.blocks[0].mlp.fc1.out_features
        if hidden % d:
            raise ValueError(f"{self.name} needs an MLP width that is a multiple of the width {d}, got {hidden}")
        if self.rank > d:
            raise ValueError(f"rank {self.rank} exceeds the width {d}; set rank <= {d}")

    def task_values(self, task_id: str) -> dict[str, Any]:
        if task_id not in self.task_settings:
            return {}
        rank, scale = self.task_settings[task_id]
        return {"rank": rank, "scale": float(scale)}

    @classmethod
    def tiny(cls) -> Self:
        return cls(rank=4)

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return FacTModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d, depth, r = backbone.embed_dim, len(backbone.blocks), self.rank
        slots = depth * (4 + 2 * (backbone.blocks[0].mlp.fc1.out_features // d))  # 144 on ViT-B/16
        cores = slots * r * r if self.kind == "tt" else slots * r + r**3
        return backbone_report(backbone, num_classes, 2 * d * r + cores)


@register_method("fact_tt")
@dataclass
class FacTTTConfig(_FacTConfig):
    """FacT-TT: per-block cores, 1536r + 144r² parameters on ViT-B/16 (rank and s per task)."""

    kind = "tt"
    task_settings = FACT_TT_TASKS


@register_method("fact_tk")
@dataclass
class FacTTKConfig(_FacTConfig):
    """FacT-TK: one core tensor and a factor over every block's slots, 1536r + 144r + r³ on ViT-B/16."""

    kind = "tk"
    task_settings = FACT_TK_TASKS
    rank: int = 16
