"""Facts about timm's ViT that several methods need, derived from its architecture hyperparameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn

if TYPE_CHECKING:
    from methods._base import ParamReport


def _norm(module: nn.Module, dim: int) -> int:
    if isinstance(module, nn.Identity):
        return 0
    if isinstance(module, nn.LayerNorm):
        return 2 * dim if module.elementwise_affine else 0
    raise NotImplementedError(f"no parameter formula for norm layer {type(module).__name__}")


def vit_param_count(vit: VisionTransformer) -> int:
    """Parameters of a (headless) timm ViT from its hyperparameters: width D, depth, patch size, MLP width.

    For ViT-B/16 at 224 px this is 85,798,656: patch embedding 3·16·16·768 + 768, CLS 768, position
    embedding 197·768, 12 blocks of 7,087,872 (two LayerNorms, qkv, proj, fc1, fc2), final LayerNorm.
    Only the architecture is read, never the tensors, so the contract tests can check the counts of a
    built model against it.
    """
    d = vit.embed_dim
    proj = vit.patch_embed.proj
    ph, pw = vit.patch_embed.patch_size
    total = proj.in_channels * ph * pw * d + (d if proj.bias is not None else 0)
    total += _norm(vit.patch_embed.norm, d)
    n_prefix = vit.num_prefix_tokens
    total += n_prefix * d  # CLS and register tokens
    if vit.pos_embed is not None:
        gh, gw = vit.patch_embed.grid_size
        total += (gh * gw + (0 if vit.no_embed_class else n_prefix)) * d
    total += _norm(vit.norm_pre, d)
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        hidden = mlp.fc1.out_features
        total += _norm(block.norm1, d) + _norm(block.norm2, d)
        total += d * 3 * d + (3 * d if attn.qkv.bias is not None else 0)
        total += _norm(attn.q_norm, attn.head_dim) + _norm(attn.k_norm, attn.head_dim) + _norm(attn.norm, d)
        total += d * d + (d if attn.proj.bias is not None else 0)
        total += d * hidden + (hidden if mlp.fc1.bias is not None else 0)
        total += _norm(mlp.norm, hidden)
        total += hidden * d + (d if mlp.fc2.bias is not None else 0)
        total += sum(d for ls in (block.ls1, block.ls2) if isinstance(ls, LayerScale))
    total += _norm(vit.norm, d) + _norm(vit.fc_norm, d)
    if vit.attn_pool is not None:
        raise NotImplementedError("no parameter formula for attention pooling")
    return total


def vit_report(backbone: VisionTransformer, num_classes: int, tunable: int, nonzero: int | None = None) -> ParamReport:
    """The parameter formula's report for a method on a ViT: its `tunable` count, a Linear(D, C) head
    ((D + 1)·C, 769·C on ViT-B/16) and the backbone by `vit_param_count`; `nonzero` defaults to `tunable`."""
    from methods._base import ParamReport

    return ParamReport(tunable=tunable, head=(backbone.num_features + 1) * num_classes,
                       backbone=vit_param_count(backbone), nonzero_tunable=tunable if nonzero is None else nonzero)  # fmt: skip
