"""AdaptFormer: a scaled bottleneck beside the frozen MLP, reading the block's residual stream.

Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022,
https://arxiv.org/abs/2205.13535; official code ShoufaChen/AdaptFormer 6967d67 (`models/adapter.py`,
`models/custom_modules.py`, `main_image.py`).

x ← x + DP(MLP(LN₂(x))) + s·(W_up dropout(ReLU(W_down x + b_down)) + b_up): the branch reads x itself
(not LN₂(x)) and gets no drop-path; no adapter LayerNorm; init "lora" (W_down kaiming-uniform(a=√5), the
rest zero): exactly the identity at init. 12·(1537h + 768) on ViT-B/16: 156,768 at h = 8 (the default,
matching the reference row's 0.16M), 1,189,632 at the official h = 64. s = 0.1, dropout 0.1.
On Swin the same branch beside every block's MLP, of its stage's width d (204,736 on Swin-B at h = 8: Σd =
12,032 over 24 blocks), through `SwinParallelBranches`; the patch mergings get none.

The paper has no VTAB-1k table; the reference row is a third-party reproduction of unconfirmed recipe.
Recipe here: the shared AdamW recipe of `methods/_petl_recipe.py` (timm's weight-decay rule, drop-path 0.1, as
PETL_Vision trains it) with PETL_Vision's lr × weight-decay grid. Not re-parameterisable (ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe
from methods._bottleneck import Bottleneck
from methods._family import Backbone, backbone_report
from methods._inject import replace_module
from methods._inject_swin import block_widths, family_blocks, parallel_branches
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method


class AdaptFormerModel(PeftModel):
    """Every block wrapped in `ParallelBranches` with an MLP-side branch that reads the residual stream."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: AdaptFormerConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        for path, block, d in family_blocks(backbone):
            replace_module(backbone, path, parallel_branches(
                block, attn_branch=None, scale=config.scale, reads_stream=True, branch_drop_path=False,
                mlp_branch=Bottleneck(d, config.hidden, act=nn.ReLU(), dropout=config.dropout, init="lora"),
            ))  # fmt: skip

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)


@register_method("adaptformer")
@dataclass
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer: a parallel scaled bottleneck beside every MLP (156,768 parameters on ViT-B/16 at h = 8).

    Attributes:
        hidden: bottleneck width h (8: the reference row's count; 64: the official image config).
        scale: s, fixed.
        dropout: dropout on the bottleneck.
        drop_path_rate: the backbone's stochastic depth (not applied to the branch).
        head_init: `torch`, `trunc_normal` or `vpt`.
    """

    category: ClassVar[str] = "adapter"
    identity_at_init: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=petl_recipe)
    hidden: int = 8
    scale: float = 0.1
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        _checks.integer(self, "hidden", 1)
        _checks.real(self, "scale")
        _checks.rates(self, "dropout", "drop_path_rate")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return AdaptFormerModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        h = self.hidden
        return backbone_report(backbone, num_classes, sum(2 * d * h + h + d for d in block_widths(backbone)))
