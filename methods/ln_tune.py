"""LN-tune: train the affine parameters (γ, β) of every LayerNorm of the frozen backbone, and the head.

No paper of its own: the baseline of PETL_Vision (OSU-MLB/PETL_Vision 245d262, `--ln`,
`experiment/config/method/ln.yml`, `experiment/build_model.py`: every parameter whose name contains "norm"
trains) and of V-PETL Bench (synbol/Parameter-Efficient-Transfer-Learning-Benchmark c188fad,
`ImageClassification/train/train_model_lntune.py`: "norm" or "head" in the name). Here the LayerNorms are found by
module type (every `nn.LayerNorm` of the backbone with affine parameters), which on ViT-B/16 is the same set:
norm1 and norm2 of each block and the final norm, 25 · 2 · 768 = 38,400 (PETL_Vision logs 38,400). Where the final
norm is `fc_norm` after average pooling (`norm` an Identity: the MAE preset) the count is what exists, the same
25 norms; a `norm_pre` (CLIP), q/k norms or a patch-embedding norm count when the backbone has them.

On Swin every LayerNorm likewise: the patch embedding's (C₀), norm1 and norm2 of each block (d), each patch
merging's LayerNorm(4d of the previous stage) and the final one: 2·(C₀ + Σ 2·depth·d + Σ 4·d_prev + C) = 57,600 on
Swin-B. The model is the backbone itself, trivially its own merged form, and it starts as the identity.

Recipe: PETL_Vision's grid (lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}, AdamW batch 64, drop-path 0.1, head as
timm's `reset_classifier`) with the shared schedule of `methods/_petl_recipe.py`. The weight-decay rule is the
suite's, as BitFit's: timm's (no vector is decayed, so only the head weight is); PETL_Vision's `make_optimizer`
decays every trainable tensor, LayerNorm weights included (`decay_all=true`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.swin_transformer import PatchMerging
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report, family
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._swin import swin_blocks
from methods._vit import norm_param_count


def layer_norms(backbone: nn.Module) -> dict[str, nn.LayerNorm]:
    """Module path -> every `nn.LayerNorm` of `backbone` with affine parameters, in module order."""
    return {name: m for name, m in backbone.named_modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}


class LayerNormAffine(TunableModule):
    """The backbone's own LayerNorm weights (and, with `biases`, their biases), registered here too (shared, not
    copied) so that the contract's structural rule finds them. Keys are module paths with `_` for `.`."""

    def __init__(self, backbone: nn.Module, *, biases: bool = True) -> None:
        super().__init__()
        params: dict[str, nn.Parameter] = {}
        for name, norm in layer_norms(backbone).items():
            key = name.replace(".", "_")
            params[f"{key}_weight"] = norm.weight
            if biases and norm.bias is not None:
                params[f"{key}_bias"] = norm.bias
        self.params = nn.ParameterDict(params)


def layer_norm_count(backbone: Backbone) -> int:
    """γ and β of every LayerNorm, from the architecture (each norm position's type and width, never the tensors):
    on a ViT the patch embedding's norm, `norm_pre`, per block norm1, norm2, the q/k norms (head width), the
    attention's and MLP's inner norms, then `norm` or `fc_norm`: 2·768·25 = 38,400 on ViT-B/16; on Swin the
    patch embedding's, per block norm1, norm2 (and an MLP norm), each patch merging's LayerNorm(4d), the final
    one: 57,600 on Swin-B."""
    if family(backbone) == "swin":
        total = norm_param_count(backbone.patch_embed.norm, backbone.patch_embed.proj.out_channels)
        for stage in backbone.layers:
            if isinstance(stage.downsample, PatchMerging):
                total += norm_param_count(stage.downsample.norm, 4 * stage.downsample.dim)
        for _, _, block in swin_blocks(backbone):
            d, hidden = block.dim, block.mlp.fc1.out_features
            total += norm_param_count(block.norm1, d) + norm_param_count(block.norm2, d)
            total += norm_param_count(block.mlp.norm, hidden)
        return total + norm_param_count(backbone.norm, backbone.num_features)
    d = backbone.embed_dim
    total = norm_param_count(backbone.patch_embed.norm, d) + norm_param_count(backbone.norm_pre, d)
    for block in backbone.blocks:
        attn, hidden = block.attn, block.mlp.fc1.out_features
        total += norm_param_count(block.norm1, d) + norm_param_count(block.norm2, d)
        total += norm_param_count(attn.q_norm, attn.head_dim) + norm_param_count(attn.k_norm, attn.head_dim)
        total += norm_param_count(attn.norm, d) + norm_param_count(block.mlp.norm, hidden)
    return total + norm_param_count(backbone.norm, d) + norm_param_count(backbone.fc_norm, d)


class VectorTuningModel(PeftModel):
    """A model that tunes backbone vectors (LN-tune's, DiffFit's) under the weight-decay rule its config chooses."""

    def __init__(self, backbone: Backbone, num_classes: int, config: VectorTuningConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.decay_all = config.decay_all

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return [] if self.decay_all else timm_no_weight_decay(self)


class LNTuneModel(VectorTuningModel):
    def __init__(self, backbone: Backbone, num_classes: int, config: LNTuneConfig) -> None:
        super().__init__(backbone, num_classes, config)
        self.ln_tune = LayerNormAffine(backbone)

    def merged_backbone(self) -> Backbone:
        return copy.deepcopy(self.backbone)


@dataclass
class VectorTuningConfig(MethodConfig):
    """The fields, checks and backbone options LN-tune and DiffFit share (PETL_Vision's recipe and grid)."""

    category: ClassVar[str] = "reparam"
    identity_at_init: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=petl_recipe)
    drop_path_rate: float = 0.1
    decay_all: bool = False
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        _checks.rates(self, "drop_path_rate")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}


@register_method("ln_tune")
@dataclass
class LNTuneConfig(VectorTuningConfig):
    """LN-tune: every LayerNorm's γ and β (38,400 parameters on ViT-B/16).

    Attributes:
        drop_path_rate: the backbone's stochastic depth.
        decay_all: apply weight decay to every trainable tensor, LayerNorm weights and biases included
            (PETL_Vision's `make_optimizer`); false: timm's rule (vectors undecayed), as BitFit.
        head_init: `torch` (timm's `reset_classifier`), `trunc_normal` or `vpt`.
    """

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        return LNTuneModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        return backbone_report(backbone, num_classes, layer_norm_count(backbone))
