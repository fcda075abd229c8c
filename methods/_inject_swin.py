"""Attaching a method's per-block modules to either backbone family, and the Swin side of `methods/_inject.py`.

- `family_blocks`: every transformer block of a timm ViT (`blocks.i`, width D) or Swin (`layers.s.blocks.i`, its
  stage's width: 128·2^s on Swin-B), as (dotted path, block, width), in forward order. A method that adds a
  module per block sizes it by that width, and swaps submodules by `path + "." + name` through `replace_module`.
- `block_widths`: the same widths from the architecture alone (`methods._swin.stage_dims`/`stage_depths`), for
  the parameter formulas.
- `SwinParallelBranches`: `ParallelBranches` for a timm `SwinTransformerBlock`, whose forward works on
  (B, H, W, C) maps, has no layer-scale and runs its attention sub-block as `_attn` (shift, windows, attention,
  merge, unshift); `parallel_branches` picks the wrapper for a block of either family.

A Swin block's Linear layers and norms act on the channel (last) dimension, token by token, so a position-wise
module attached to them (LoRA, SSF, RepAdapter, a bottleneck adapter) means on Swin what it means on a ViT.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from methods._family import Backbone, family
from methods._inject import ParallelBranches
from methods._swin import stage_depths, stage_dims, swin_blocks


def family_blocks(backbone: Backbone) -> list[tuple[str, nn.Module, int]]:
    """(dotted path, block, width) of every block: ViT `blocks.i` at the embedding width, Swin
    `layers.s.blocks.i` at its stage's width."""
    if family(backbone) == "vit":
        return [(f"blocks.{i}", block, backbone.embed_dim) for i, block in enumerate(backbone.blocks)]
    return [(f"layers.{s}.blocks.{i}", block, block.dim) for s, i, block in swin_blocks(backbone)]


def block_widths(backbone: Backbone) -> list[int]:
    """The width of every block, in forward order, read from the architecture's hyperparameters."""
    if family(backbone) == "vit":
        return [backbone.embed_dim] * len(backbone.blocks)
    return [d for d, n in zip(stage_dims(backbone), stage_depths(backbone), strict=True) for _ in range(n)]


class SwinParallelBranches(ParallelBranches):
    """A timm `SwinTransformerBlock` with scaled branches beside its attention and/or MLP sub-blocks:

        x ← x + drop_path1(_attn(norm1(x)))      + scale · drop_path1(attn_branch(norm1(x)))
        x ← x + drop_path2(mlp(norm2(x)))        + scale · drop_path2(mlp_branch(norm2(x)))

    on the block's (B, H, W, C) map (the MLP side on its (B, H·W, C) view, as timm's block reshapes it). The
    branches are position-wise, so they read the map directly, not its windows. Options as `ParallelBranches`.
    """

    block_kind = "SwinTransformerBlock"
    block_parts = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        B, H, W, C = x.shape
        y = b.norm1(x)
        out = x + b.drop_path1(b._attn(y))
        if self.attn_branch is not None:
            out = out + self._branch(self.attn_branch, b.drop_path1, x if self.reads_stream else y)
        out = out.reshape(B, -1, C)
        y = b.norm2(out)
        stream = out
        out = out + b.drop_path2(b.mlp(y))
        if self.mlp_branch is not None:
            out = out + self._branch(self.mlp_branch, b.drop_path2, stream if self.reads_stream else y)
        return out.reshape(B, H, W, C)


def parallel_branches(block: nn.Module, **kwargs) -> ParallelBranches:
    """`SwinParallelBranches` for a Swin block, `ParallelBranches` otherwise (same keyword arguments)."""
    cls = SwinParallelBranches if isinstance(block, SwinTransformerBlock) else ParallelBranches
    return cls(block, **kwargs)
