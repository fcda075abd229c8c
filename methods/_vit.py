"""Facts about timm's ViT that several methods need, derived from its architecture hyperparameters."""

from __future__ import annotations

from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def norm_param_count(module: nn.Module, dim: int) -> int:
    """Parameters of a norm layer of width `dim` (an `nn.Identity` has none)."""
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
    total += norm_param_count(vit.patch_embed.norm, d)
    n_prefix = vit.num_prefix_tokens
    total += n_prefix * d  # CLS and register tokens
    if vit.pos_embed is not None:
        gh, gw = vit.patch_embed.grid_size
        total += (gh * gw + (0 if vit.no_embed_class else n_prefix)) * d
    total += norm_param_count(vit.norm_pre, d)
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        hidden = mlp.fc1.out_features
        total += norm_param_count(block.norm1, d) + norm_param_count(block.norm2, d)
        total += d * 3 * d + (3 * d if attn.qkv.bias is not None else 0)
        total += (
            norm_param_count(attn.q_norm, attn.head_dim)
            + norm_param_count(attn.k_norm, attn.head_dim)
            + norm_param_count(attn.norm, d)
        )
        total += d * d + (d if attn.proj.bias is not None else 0)
        total += d * hidden + (hidden if mlp.fc1.bias is not None else 0)
        total += norm_param_count(mlp.norm, hidden)
        total += hidden * d + (d if mlp.fc2.bias is not None else 0)
        total += sum(d for ls in (block.ls1, block.ls2) if isinstance(ls, LayerScale))
    total += norm_param_count(vit.norm, d) + norm_param_count(vit.fc_norm, d)
    if vit.attn_pool is not None:
        raise NotImplementedError("no parameter formula for attention pooling")
    return total
