"""Facts about timm's `SwinTransformer` that several methods need, derived from its architecture.

timm's Swin works on (B, H, W, C) feature maps in four stages; a stage's `downsample` (a `PatchMerging`, or
`nn.Identity` in stage 0) runs at its start, then its blocks (window attention, then an MLP, each with a
residual). The official Microsoft (and VPT) code merges at the end of a stage instead: the same
computation, whose checkpoints timm's `checkpoint_filter_fn` renames.
"""

from __future__ import annotations

from collections.abc import Iterator

from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from torch import nn

from methods._vit import norm_param_count


def swin_blocks(swin: SwinTransformer) -> Iterator[tuple[int, int, SwinTransformerBlock]]:
    """(stage, index in the stage, block) for every block, in forward order."""
    for s, stage in enumerate(swin.layers):
        for i, block in enumerate(stage.blocks):
            yield s, i, block


def stage_dims(swin: SwinTransformer) -> list[int]:
    """The width of each stage's blocks (128, 256, 512, 1024 on Swin-B)."""
    return [stage.blocks[0].dim for stage in swin.layers]


def stage_depths(swin: SwinTransformer) -> list[int]:
    """The number of blocks in each stage (2, 2, 18, 2 on Swin-B)."""
    return [len(stage.blocks) for stage in swin.layers]


def _linear(layer: nn.Linear) -> int:
    return layer.in_features * layer.out_features + (layer.out_features if layer.bias is not None else 0)


def swin_block_param_count(block: SwinTransformerBlock) -> int:
    """One block: two LayerNorms, qkv, proj, the relative-position bias table, fc1, fc2."""
    d, attn, mlp = block.dim, block.attn, block.mlp
    table = (2 * attn.window_size[0] - 1) * (2 * attn.window_size[1] - 1) * attn.num_heads
    total = norm_param_count(block.norm1, d) + norm_param_count(block.norm2, d)
    total += _linear(attn.qkv) + _linear(attn.proj) + table
    total += _linear(mlp.fc1) + norm_param_count(mlp.norm, mlp.fc1.out_features) + _linear(mlp.fc2)
    return total


def swin_param_count(swin: SwinTransformer) -> int:
    """Parameters of a (headless) timm Swin from its hyperparameters.

    For Swin-B (patch 4, window 7, widths 128·2^s, depths 2, 2, 18, 2) this is 86,743,224: the patch
    embedding 3·4·4·128 + 128 and its LayerNorm, each block by `swin_block_param_count` (a window-7 bias table
    is 13·13·heads), each patch merging LayerNorm(4C) and Linear(4C → 2C) without bias, the final LayerNorm.
    Only the architecture is read, never the tensors, so the contract tests can check a built model's count.
    """
    proj = swin.patch_embed.proj
    ph, pw = proj.kernel_size
    total = proj.in_channels * ph * pw * proj.out_channels + (proj.out_channels if proj.bias is not None else 0)
    total += norm_param_count(swin.patch_embed.norm, proj.out_channels)
    for stage in swin.layers:
        merge = stage.downsample
        if isinstance(merge, PatchMerging):
            total += norm_param_count(merge.norm, 4 * merge.dim) + _linear(merge.reduction)
        elif not isinstance(merge, nn.Identity):
            raise NotImplementedError(f"no parameter formula for downsampling layer {type(merge).__name__}")
        total += sum(swin_block_param_count(b) for b in stage.blocks)
    return total + norm_param_count(swin.norm, swin.num_features)
