"""RepAdapter: linear adapters before attention and MLP, folded into qkv and fc1 for inference.

Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization", arXiv 2302.08106;
official code luogen1996/RepAdapter 360992f (`repadapter.py`, `train.py`, `configs/repblock/<task>.yaml`).

R(z) = z + s·(B dropout(A z + a) + b): A = Linear(D → h) (xavier-uniform, a = 0), B a 1×1 grouped conv
h → D with g groups (output channels [i·D/g, (i+1)·D/g) read hidden units [i·h/g, (i+1)·h/g)), weight and
bias zero, so R starts as the identity; dropout 0.1; no activation. `repblock` placement: on the LayerNorm
outputs before attention and before the MLP, x ← x + DP(attn(R₁(LN₁(x)))), x ← x + DP(mlp(R₂(LN₂(x)))); in
timm LN₁ feeds only `attn.qkv` and LN₂ only `mlp.fc1`, so R is attached as a module before those Linears,
and folds into them exactly (`merged_backbone`): W' = W M, b' = W m + b with M = I + s B_dense A,
m = s (B_dense a + b). Per module D·h + h + D·h/g + D; 24 modules, h = 8, g = 2: 239,808 on ViT-B/16
(the paper's 0.22M counts the weights only, 221,184). s per task from the official configs.
On Swin the same two adapters per block, before the window attention's qkv and before fc1, of the stage's width
d (both Linears have biases, so they fold as on a ViT); the patch mergings get none (the paper's Swin code is not
in the spec: the suite's choice).

Recipe (`train.py`): AdamW lr 1e-3, weight decay 1e-4 on every trainable tensor, batch 64, 100 epochs, timm
cosine warm-up 10 from 1e-6 to 1e-5 stepped per epoch, drop-path 0.1, head as timm's `reset_classifier`.
The official main-branch `train.py` trains with cross-entropy alone. A term λ·Σ‖W_B‖₂ (the Frobenius norm of
every B weight, not squared) exists only on an unmerged side branch of the official repository (1285c27,
`--sparse_lambda`), whose scripts all pass λ = 0: here `sparse_lambda`, default 0 (off), kept as an option.
The official code kept the best of ten test evaluations; the suite reports the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._inject import Wrapped, replace_module
from methods._inject_swin import block_widths, family_blocks
from methods._merge import merge_backbone
from methods._per_task import PerTaskSettings
from methods._petl_recipe import petl_recipe
from methods._registry import register_method

# s per task (official configs/repblock; searched over {0.1, 0.5, 1, 5, 10}).
REPADAPTER_SCALES = {
    "cifar100": 0.1, "caltech101": 5, "dtd": 1, "flowers102": 0.5, "pets": 0.1, "svhn": 10, "sun397": 0.1,
    "camelyon": 1, "eurosat": 1, "resisc45": 5, "retinopathy": 0.1, "clevr_count": 0.5, "clevr_dist": 0.1,
    "dmlab": 5, "kitti": 5, "dsprites_loc": 5, "dsprites_ori": 0.1, "smallnorb_azi": 10, "smallnorb_ele": 1,
}  # fmt: skip


class RepAdapter(TunableModule):
    """z + s·(B dropout(A z + a) + b) on [.., D], B block-diagonal with `groups` blocks."""

    def __init__(self, dim: int, hidden: int, groups: int, *, scale: float, dropout: float) -> None:
        super().__init__()
        self.groups = groups
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Conv1d(hidden, dim, 1, groups=groups)  # weight [D, h/g, 1], the official layout
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def dense_up(self) -> Tensor:
        """B as a dense [D, h] matrix: zero outside its `groups` diagonal blocks of [D/g, h/g]."""
        d, per_group = self.up.weight.shape[:2]
        return torch.block_diag(*self.up.weight.reshape(self.groups, d // self.groups, per_group))

    def forward(self, z: Tensor) -> Tensor:
        h = self.dropout(self.down(z))
        return z + F.linear(h, self.dense_up(), self.up.bias) * self.scale

    def input_affine(self) -> tuple[Tensor, Tensor]:
        """(M, m) with R(z) = M z + m (dropout off)."""
        b = self.dense_up()
        eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
        return eye + self.scale * b @ self.down.weight, self.scale * (b @ self.down.bias + self.up.bias)


class RepAdapterModel(PeftModel):
    """`attn.qkv` and `mlp.fc1` of every block (or qkv only) wrapped with a RepAdapter before them."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: RepAdapterConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.sparse_lambda = config.sparse_lambda
        targets = ("attn.qkv", "mlp.fc1") if config.placement == "block" else ("attn.qkv",)
        for prefix, _, d in family_blocks(backbone):
            for target in targets:
                path = f"{prefix}.{target}"
                adapter = RepAdapter(d, config.hidden, config.groups, scale=config.scale, dropout=config.dropout)
                replace_module(backbone, path, Wrapped(backbone.get_submodule(path), before=adapter))

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return []  # the official AdamW decays every trainable tensor, head included

    def regularization(self) -> Tensor | None:
        if self.sparse_lambda == 0:
            return None
        norms = [m.up.weight.norm() for m in self.tunable_modules() if isinstance(m, RepAdapter)]
        return self.sparse_lambda * torch.stack(norms).sum()

    def merged_backbone(self) -> VisionTransformer:
        return merge_backbone(self.backbone)


@register_method("repadapter")
@dataclass
class RepAdapterConfig(PerTaskSettings, MethodConfig):
    """RepAdapter: re-parameterisable adapters before qkv and fc1 (239,808 parameters on ViT-B/16).

    Attributes:
        scale: s (per task in `for_task`).
        hidden: h, the adapter width.
        groups: g, the groups of the up-projection (must divide h and the width).
        dropout: dropout between A and B.
        placement: `block` (before attention and MLP, the VTAB variant `repblock`) or `attn` (`repattn`).
        sparse_lambda: weight of Σ‖W_B‖₂ in the loss (the side branch's `--sparse_lambda`; 0, the default and
            the main branch's objective, turns it off).
        drop_path_rate: the backbone's stochastic depth.
        head_init: `torch` (timm's `reset_classifier`), `trunc_normal` or `vpt`.
        per_task: apply the per-task s in `for_task`.
    """

    category: ClassVar[str] = "reparam"
    identity_at_init: ClassVar[bool] = True
    version: ClassVar[int] = 2  # 2: sparse_lambda 0 by default (cross-entropy alone, as the official main branch)
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=petl_recipe)
    scale: float = 1.0
    hidden: int = 8
    groups: int = 2
    dropout: float = 0.1
    placement: str = "block"
    sparse_lambda: float = 0.0
    drop_path_rate: float = 0.1
    head_init: str = "torch"
    per_task: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"placement": ("block", "attn"), "head_init": HEAD_INITS})
        _checks.integer(self, "hidden", 1)
        _checks.integer(self, "groups", 1)
        _checks.divisor(self, "groups", self.hidden, "hidden")
        _checks.real(self, "scale")
        _checks.rates(self, "dropout", "drop_path_rate")
        _checks.real(self, "sparse_lambda", 0.0)

    def check_backbone(self, backbone: Backbone) -> None:
        for d in sorted(set(block_widths(backbone))):
            if d % self.groups:
                raise ValueError(f"groups ({self.groups}) must divide the width {d}")

    def task_values(self, task_id: str) -> dict[str, Any]:
        return {"scale": float(REPADAPTER_SCALES[task_id])} if task_id in REPADAPTER_SCALES else {}

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return RepAdapterModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        h, per_block = self.hidden, 2 if self.placement == "block" else 1
        per_module = [d * h + h + d * h // self.groups + d for d in block_widths(backbone)]  # 9,992 at 768, 8, 2
        return backbone_report(backbone, num_classes, per_block * sum(per_module))
