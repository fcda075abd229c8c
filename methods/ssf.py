"""SSF: Scaling and Shifting the frozen ViT's features.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022,
https://arxiv.org/abs/2210.08823; official code dongzelian/SSF e94e0e7 (`models/vision_transformer.py`,
`train_scripts/vit/vtab/{cifar_100,dtd}/train_ssf.sh`).

SSF(z) = γ ⊙ z + β over channels, γ ~ N(1, 0.02²), β ~ N(0, 0.02²), after: the patch-embedding projection,
and in every block `norm1`, `attn.qkv` (before the head split), `attn.proj` (before its dropout), `norm2`,
`mlp.fc1` (before GELU), `mlp.fc2`, and the final `norm`. Tunable 2·(2D + L·(7D + 4D)) with a 4D MLP:
205,824 on ViT-B/16. Each follows a Linear, LayerNorm or conv and folds into it (`merged_backbone`).

Recipe (the two released VTAB scripts): AdamW lr 5e-3, weight decay 5e-5 (timm's rule: γ, β never
decayed), batch 64 (timm's training loader drops the last batch), 100 epochs, warm-up 10 from 1e-7, cosine to 1e-8, drop-path 0, head as timm's
`reset_classifier` (PyTorch default). SSF's trainer steps its scheduler at epoch + 1 after each epoch, so
its epoch e runs at the value the suite's `timm-cosine` gives epoch e + 1 (one epoch ahead; unconfirmed
which is better). The per-task lr/weight decay of the other 17 tasks are unreleased: the grid protocol
searches PETL_Vision's grid. SSF's rows used AugReg IN-21k weights; on `orig_in21k` they are not like-for-like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import backbone_report
from methods._inject import Wrapped, replace_module
from methods._merge import merge_backbone
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method

# Per block: the submodules SSF follows, and how their output width is read.
SSF_BLOCK_POINTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(TunableModule):
    """γ ⊙ z + β over the channel dimension: the last one, or dimension 1 of a conv's [B, C, H, W] output."""

    def __init__(self, channels: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty(channels).normal_(0.0, init_std))

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 4:
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


def ssf_points(vit: VisionTransformer) -> list[str]:
    """Dotted paths of the modules SSF follows, in forward order."""
    blocks = [f"blocks.{i}.{p}" for i in range(len(vit.blocks)) for p in SSF_BLOCK_POINTS]
    return ["patch_embed.proj", *blocks, "norm"]


class SSFModel(PeftModel):
    """Every SSF point's module replaced by `Wrapped(module, after=ScaleShift)`."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: SSFConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        for path in ssf_points(backbone):
            module = backbone.get_submodule(path)
            replace_module(backbone, path, Wrapped(module, after=ScaleShift(_width(module), config.init_std)))

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

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d, hidden = backbone.embed_dim, backbone.blocks[0].mlp.fc1.out_features
        per_block = 2 * (d + 3 * d + d + d + hidden + d)  # 16,896 at D = 768
        return backbone_report(backbone, num_classes, len(backbone.blocks) * per_block + 2 * 2 * d)
