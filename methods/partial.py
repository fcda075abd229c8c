"""Partial-1: fine-tune the last transformer block and the final norm of the ViT, plus the head (VPT's baseline).

Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119 (Table 1, "Partial-1", after
Yosinski et al. 2014). Official code read: KMnP/vpt 4410440, `src/models/vit_models.py` (`ViT.build_backbone`,
`transfer_type == "partial-1"`): every encoder parameter is frozen except those whose name contains
`transformer.encoder.layer.{L-1}` (the last block: its two LayerNorms, qkv, proj, fc1, fc2) or
`transformer.encoder.encoder_norm` (the final LayerNorm, which feeds the CLS feature to the head). The head is
VPT's linear head (`MLP(mlp_dims=[C])`: kaiming-normal fan_out, bias -4.5951), trained. Here the last blocks and
the final norm are taken by structure (`backbone.blocks[-k:]`, `backbone.norm`, and `backbone.fc_norm` where a
pooled ViT has one), never by name. The code's `partial-2` and `partial-4` (the last 2 or 4 blocks) are the option
`blocks` (`--set blocks=2`). The frozen rest stays bit-identical; the model is the backbone itself, so it is its
own merged form and starts as the identity (logits = frozen backbone + head).

The code also puts the encoder in eval mode during training (`froze_enc`); timm's ViT has no dropout or drop-path
at its defaults, so train and eval mode coincide there.

Recipe: VPT's SGD recipe of the `full` and `linear` baselines (`methods/baselines.py`): momentum 0.9, warm-up 10
of 100 epochs then cosine, batch 64, weight decay on everything but the head bias; tune_vtab.py has no grid of its
own for partial tuning, so the suite takes full fine-tuning's base-lr grid (it trains backbone weights) scaled by
batch/256, × weight decay {0.01, 1e-3, 1e-4, 0}.

Parameters: k·(block) + final norm, block = 2·2D (norms) + 3D² + 3D (qkv) + D² + D (proj) + 2·D·H + H + D (MLP);
ViT-B/16 (D = 768, H = 3072): 7,087,872 per block + 1,536 = 7,089,408 for Partial-1 (head 769·C apart).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from timm.layers import LayerScale
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe
from methods._family import backbone_report
from methods._registry import register_method
from methods._vit import norm_param_count
from methods.baselines import FULL_BASE_LRS, sgd_recipe


def block_param_count(block: Block, d: int) -> int:
    """Parameters of one timm ViT block of width `d`, from its architecture (never its tensors)."""
    attn, mlp = block.attn, block.mlp
    hidden = mlp.fc1.out_features
    total = norm_param_count(block.norm1, d) + norm_param_count(block.norm2, d)
    total += 3 * d * d + (3 * d if attn.qkv.bias is not None else 0)
    total += norm_param_count(attn.q_norm, attn.head_dim) + norm_param_count(attn.k_norm, attn.head_dim)
    total += norm_param_count(attn.norm, d)
    total += d * d + (d if attn.proj.bias is not None else 0)
    total += d * hidden + (hidden if mlp.fc1.bias is not None else 0) + norm_param_count(mlp.norm, hidden)
    total += hidden * d + (d if mlp.fc2.bias is not None else 0)
    return total + sum(d for ls in (block.ls1, block.ls2) if isinstance(ls, LayerScale))


class PartialFinetune(PeftModel):
    """The last `blocks` transformer blocks and the final norm train with the head; the rest stays frozen."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, *, blocks: int, head_init: str) -> None:
        super().__init__(backbone, num_classes, head_init=head_init)
        self.blocks = blocks

    def tunable_modules(self) -> list[nn.Module]:
        vit = self.backbone
        return [*vit.blocks[len(vit.blocks) - self.blocks :], vit.norm, vit.fc_norm]

    def merged_backbone(self) -> VisionTransformer:
        return copy.deepcopy(self.backbone).requires_grad_(False)  # the fine-tuned backbone itself


@register_method("partial_1")
@dataclass
class PartialConfig(MethodConfig):
    """VPT's Partial-k baseline (k = 1 by default).

    Attributes:
        blocks: how many of the last transformer blocks train (VPT's code: 1, 2 or 4).
        head_init: `vpt` (kaiming-normal fan_out, bias -4.5951), `torch` or `trunc_normal`.
    """

    category: ClassVar[str] = "baseline"
    identity_at_init: ClassVar[bool] = True
    needs: ClassVar[str] = "a ViT's blocks and final norm (timm's VisionTransformer)"
    model_cls: ClassVar[type[PeftModel]] = PartialFinetune

    blocks: int = 1
    head_init: str = "vpt"
    recipe: Recipe = field(default_factory=lambda: sgd_recipe(0.0025, 1e-4, FULL_BASE_LRS))

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.integer(self, "blocks", 1)
        _checks.choice(self, "head_init", HEAD_INITS)

    def check_backbone(self, backbone: VisionTransformer) -> None:
        depth = len(backbone.blocks)
        if self.blocks > depth:
            raise _checks.invalid(self, "blocks", f"exceeds the backbone's depth {depth}", depth)

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return PartialFinetune(backbone, num_classes, blocks=self.blocks, head_init=self.head_init)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d = backbone.embed_dim
        tail = backbone.blocks[len(backbone.blocks) - self.blocks :]
        tunable = sum(block_param_count(b, d) for b in tail)
        tunable += norm_param_count(backbone.norm, d) + norm_param_count(backbone.fc_norm, d)
        return backbone_report(backbone, num_classes, tunable)
