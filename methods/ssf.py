"""SSF: Scaling and Shifting the frozen ViT's features.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022,
https://arxiv.org/abs/2210.08823; official code dongzelian/SSF e94e0e7 (`models/vision_transformer.py`,
`train_scripts/vit/vtab/{cifar_100,dtd}/train_ssf.sh`).

SSF(z) = γ ⊙ z + β over channels, γ ~ N(1, 0.02²), β ~ N(0, 0.02²), after: the patch-embedding projection,
and in every block `norm1`, `attn.qkv` (before the head split), `attn.proj` (before its dropout), `norm2`,
`mlp.fc1` (before GELU), `mlp.fc2`, and the final `norm`. Tunable 2·(2D + L·(7D + 4D)) with a 4D MLP:
205,824 on ViT-B/16. Each follows a Linear, LayerNorm or conv and folds into it (`merged_backbone`).

On Swin, SSF's rule (a scale and shift after every linear operation and LayerNorm) gives, besides the same six
points per block (sized by the stage's width) and the final norm, the patch embedding's LayerNorm and each
patch merging's LayerNorm(4d) and reduction Linear(4d → 2d): 278,016 on Swin-B. timm's reduction has no bias to
take the shift, so on Swin `merged_backbone` refuses (`NotMergeableError`) rather than change the architecture.

Recipe (the two released VTAB scripts): AdamW lr 5e-3, weight decay 5e-5 (timm's rule: γ, β never
decayed), batch 64 (timm's training loader drops the last batch), 100 epochs, warm-up 10 from 1e-7, cosine to 1e-8, drop-path 0, head as timm's
`reset_classifier` (PyTorch default). SSF's trainer steps its scheduler at epoch + 1 after each epoch, so
its epoch e runs at the value the suite's `timm-cosine` gives epoch e + 1 (one epoch ahead; unconfirmed
which is better). The per-task lr/weight decay of the other 17 tasks are unreleased: the grid protocol
searches PETL_Vision's grid. SSF's rows used AugReg IN-21k weights; on `orig_in21k` they are not like-for-like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report, family
from methods._inject import Wrapped, replace_module
from methods._merge import merge_backbone
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._swin import stage_depths, stage_dims

# Per block: the submodules SSF follows, and how their output width is read.
SSF_BLOCK_POINTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(TunableModule):
    """γ ⊙ z + β over the channel dimension: the last one, or (`conv`) dimension 1 of a conv's [B, C, H, W] output
    (Swin's (B, H, W, C) maps keep their channels last)."""

    def __init__(self, channels: int, init_std: float = 0.02, *, conv: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.scale = nn.Parameter(torch.empty(channels).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty(channels).normal_(0.0, init_std))

    def forward(self, z: Tensor) -> Tensor:
        if self.conv:
            return torch.addcmul(self.shift[:, None, None], z, self.scale[:, None, None])
        return torch.addcmul(self.shift, z, self.scale)

    def output_affine(self) -> tuple[Tensor, Tensor]:
        return self.scale, self.shift


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise TypeError(f"SSF follows a Linear, LayerNorm or Conv2d, got {type(module).__name__}")


def ssf_points(backbone: Backbone) -> list[str]:
    """Dotted paths of the modules SSF follows, in forward order (on Swin also the patch embedding's LayerNorm
    and each patch merging's LayerNorm and reduction)."""
    if family(backbone) == "vit":
        blocks = [f"blocks.{i}.{p}" for i in range(len(backbone.blocks)) for p in SSF_BLOCK_POINTS]
        # The final norm: `fc_norm` after pooling where the backbone has no `norm` (MAE's average pooling).
        final = (
            "fc_norm"
            if isinstance(backbone.norm, nn.Identity) and not isinstance(backbone.fc_norm, nn.Identity)
            else "norm"
        )
        return ["patch_embed.proj", *blocks, final]
    points = ["patch_embed.proj", "patch_embed.norm"]
    for s, stage in enumerate(backbone.layers):
        if s > 0:
            points += [f"layers.{s}.downsample.norm", f"layers.{s}.downsample.reduction"]
        points += [f"layers.{s}.blocks.{i}.{p}" for i in range(len(stage.blocks)) for p in SSF_BLOCK_POINTS]
    return [*points, "norm"]


class SSFModel(PeftModel):
    """Every SSF point's module replaced by `Wrapped(module, after=ScaleShift)`."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: SSFConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        for path in ssf_points(backbone):
            module = backbone.get_submodule(path)
            shift = ScaleShift(_width(module), config.init_std, conv=isinstance(module, nn.Conv2d))
            replace_module(backbone, path, Wrapped(module, after=shift))

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)

    def merged_backbone(self) -> VisionTransformer:
        return merge_backbone(self.backbone)


@register_method("ssf")
@dataclass
class SSFConfig(MethodConfig):
    """SSF: a scale and shift after every linear op and LayerNorm (205,824 parameters on ViT-B/16).

    Attributes:
        init_std: γ ~ N(1, init_std²), β ~ N(0, init_std²).
        drop_path_rate: the backbone's stochastic depth (0 in SSF's scripts).
        head_init: `torch` (timm's `reset_classifier`), `trunc_normal` or `vpt`.
    """

    category: ClassVar[str] = "reparam"
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(
        default_factory=lambda: petl_recipe(lr=5e-3, weight_decay=5e-5, warmup_start_lr=1e-7, min_lr=1e-8)
    )
    init_std: float = 0.02
    drop_path_rate: float = 0.0
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        _checks.real(self, "init_std", 0.0)
        _checks.rates(self, "drop_path_rate")

    def check_backbone(self, backbone: VisionTransformer) -> None:
        for path in ssf_points(backbone):
            module = backbone.get_submodule(path)
            if not isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d)):
                raise ValueError(f"ssf follows {path}, which is a {type(module).__name__} in this backbone")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return SSFModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        if family(backbone) == "swin":
            return backbone_report(backbone, num_classes, swin_ssf_count(backbone))
        d, hidden = backbone.embed_dim, backbone.blocks[0].mlp.fc1.out_features
        per_block = 2 * (d + 3 * d + d + d + hidden + d)  # 16,896 at D = 768
        return backbone_report(backbone, num_classes, len(backbone.blocks) * per_block + 2 * 2 * d)


def swin_ssf_count(swin: SwinTransformer) -> int:
    """SSF on a timm Swin from its hyperparameters: 2·(2C₀) after the patch embedding's conv and LayerNorm, per
    block 2·(7d + MLP width), per patch merging 2·(4d + 2d) after its LayerNorm(4d) and reduction (4d → 2d), 2·C
    after the final LayerNorm: 278,016 on Swin-B."""
    dims, depths = stage_dims(swin), stage_depths(swin)
    total = 2 * 2 * dims[0] + 2 * swin.num_features
    for s, (d, depth) in enumerate(zip(dims, depths, strict=True)):
        hidden = swin.layers[s].blocks[0].mlp.fc1.out_features
        total += depth * 2 * (d + 3 * d + d + d + hidden + d)
        if s > 0:
            merge = swin.layers[s].downsample
            total += 2 * (4 * merge.dim + merge.out_dim)
    return total
