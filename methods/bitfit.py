"""BitFit: train every bias of the frozen ViT (LayerNorm biases included) and the head.

Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", ACL 2022, https://arxiv.org/abs/2106.10199. No official vision code; the vision code
bases (V-PETL Bench c188fad, PETL_Vision 245d262) select parameters whose name contains "bias". Here the
biases are found by module type (every Linear, Conv2d and LayerNorm of the backbone), which on ViT-B/16
gives the same set: patch embedding, per block qkv, proj, fc1, fc2, norm1 and norm2, the final norm:
12·8,448 + 768 + 768 = 102,912. LayerNorm weights stay frozen. The model is the backbone itself, so it
is trivially its own merged form, and it starts as the identity.

On Swin the same rule (module type) gives the patch embedding's conv and LayerNorm biases, every block's six,
each patch merging's LayerNorm bias (its reduction Linear has none) and the final LayerNorm's: 137,216 on Swin-B.
The relative-position bias tables are not bias terms in BitFit's sense (BitFit's are the additive biases of
the linear layers and norms: a table is an attention-logit parameter, looked up by relative position), so they
stay frozen, although a selection by the substring "bias" in parameter names, as the vision code bases do it,
would take them too (+ 13·13·heads per block, 63,544 on Swin-B).

Recipe: the spec leaves BitFit's to the suite (its V-PETL cells probably reproduce VPT's "Bias" baseline,
unconfirmed): the shared AdamW recipe of the PEFT baselines, lr 1e-3, with timm's weight-decay rule (so no
bias is decayed, only the head weight) and PETL_Vision's lr × weight-decay grid; drop-path 0.1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report, family
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._swin import stage_depths, stage_dims

BIASED = (nn.Linear, nn.Conv2d, nn.LayerNorm)


def backbone_biases(vit: nn.Module) -> dict[str, nn.Parameter]:
    """Module path -> bias of every Linear, Conv2d and LayerNorm in `vit`, in module order."""
    return {name: m.bias for name, m in vit.named_modules() if isinstance(m, BIASED) and m.bias is not None}


class Biases(TunableModule):
    """The backbone's own bias tensors, registered here too (shared, not copied), so that the contract's
    structural rule finds them: they are the one thing BitFit trains. Keys are module paths with `_` for `.`."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.biases = nn.ParameterDict({name.replace(".", "_"): p for name, p in backbone_biases(vit).items()})


class BitFitModel(PeftModel):
    def __init__(self, backbone: VisionTransformer, num_classes: int, config: BitFitConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.bitfit = Biases(backbone)

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)

    def merged_backbone(self) -> VisionTransformer:
        return copy.deepcopy(self.backbone)


@register_method("bitfit")
@dataclass
class BitFitConfig(MethodConfig):
    """BitFit: every bias of the backbone, LayerNorm biases included (102,912 parameters on ViT-B/16).

    Attributes:
        drop_path_rate: the backbone's stochastic depth.
        head_init: `torch`, `trunc_normal` or `vpt`.
    """

    category: ClassVar[str] = "reparam"
    identity_at_init: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=petl_recipe)
    drop_path_rate: float = 0.1
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        _checks.rates(self, "drop_path_rate")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return BitFitModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        if family(backbone) == "swin":
            return backbone_report(backbone, num_classes, swin_bias_count(backbone))
        d, hidden = backbone.embed_dim, backbone.blocks[0].mlp.fc1.out_features
        per_block = 3 * d + d + hidden + d + 2 * d  # qkv, proj, fc1, fc2, norm1, norm2: 8,448 at D = 768
        return backbone_report(backbone, num_classes, len(backbone.blocks) * per_block + d + d)


def swin_bias_count(swin: SwinTransformer) -> int:
    """Biases of a timm Swin from its hyperparameters: the patch embedding's conv and LayerNorm (2·C₀), per block
    qkv, proj, fc1, fc2, norm1, norm2 (7d + MLP width), each patch merging's LayerNorm(4d) (its reduction has
    no bias), the final LayerNorm: 137,216 on Swin-B."""
    c0 = stage_dims(swin)[0]
    total = 2 * c0
    for s, (d, depth) in enumerate(zip(stage_dims(swin), stage_depths(swin), strict=True)):
        hidden = swin.layers[s].blocks[0].mlp.fc1.out_features
        total += depth * (3 * d + d + hidden + d + 2 * d)
        if s > 0:
            total += 4 * stage_dims(swin)[s - 1]
    return total + swin.num_features
