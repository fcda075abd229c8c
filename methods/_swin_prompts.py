"""Prompt tokens on timm's `SwinTransformer`: the Swin counterpart of `methods/_inject.py`'s token helpers.

timm's Swin works on (B, H, W, C) feature maps, to which tokens cannot be appended, so prompts travel as a side
tensor [B, p, C] beside the map, and the backbone's own modules (patch embedding, each block's norms, qkv,
projection and MLP, each patch merging's norm and reduction, the final norm) do all the work; only the order of
calls and the attention's few lines of head splitting are written here (timm's `WindowAttention.forward` cannot
take extra tokens). The flow is VPT's on Swin (KMnP/vpt, `src/models/vit_prompt/swin_transformer.py`):

- a block applies `norm1` to every token, shifts and partitions the patches into windows, replicates the
  prompts into every window ([nW·B, p + area, C]), attends with the relative-position bias and the shift mask
  padded with zeros for the prompt rows and columns, averages the prompt outputs over the windows, reverses and
  un-shifts the windows, adds the residual, then `norm2` and the MLP on every token;
- a patch merging concatenates 4 copies of each prompt (4C), then its `norm` and `reduction` act on them;
- extra key/value tokens per window attention (E²VPT) are prepended to the keys and values (the official
  `LAYER_BEHIND=True` default), with zero bias and mask columns;
- the final norm acts on every token; pooling averages all tokens, prompts included (`all`), or the patches only
  (`image`, the backbone's own head pooling).

Window order (`window_order`): the official block replicates the prompts window-major (`expand(nW, B, …)`) while
the patch windows are batch-major (timm's and the official `window_partition`), and averages them back with
`view(-1, B, p, C).mean(0)`. With a batch of more than one image, window j of image b is paired with the prompts
of image j mod B, and each image's prompt outputs average windows of several images. `official` reproduces
this; `per_sample` pairs each image's windows with its own prompts. With one image per batch, or one window per
image, both are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from methods._base import PeftModel, TunableModule
from methods._inject import attend, prepend_kv
from methods._swin import stage_depths, stage_dims

WINDOW_ORDERS = ("official", "per_sample")
POOLS = ("all", "image")
# (keys, values) for one window attention, [heads, n, head_dim] or [nW·B, heads, n, head_dim]; None: no extra tokens.
ExtraKV = Callable[[int], tuple[Tensor, Tensor]] | None


def swin_prompt_init_bound(swin: SwinTransformer) -> float:
    """VPT's uniform bound on Swin, sqrt(6 / (in_chans·patch_h·patch_w + C0)) with C0 the stage-0 width, used for
    the prompts of every stage (0.1846 on Swin-B: patch 4, width 128)."""
    proj = swin.patch_embed.proj
    ph, pw = proj.kernel_size
    return math.sqrt(6.0 / (proj.in_channels * ph * pw + stage_dims(swin)[0]))


def deep_prompt_shapes(swin: SwinTransformer, num_tokens: int) -> list[tuple[int, int, int]]:
    """The official per-stage deep prompt tensors: [depth0 − 1, p, C0], then [depth_s, p, C_s] (the first block
    of stage 0 takes the input prompts)."""
    return [
        (d - (s == 0), num_tokens, c)
        for s, (d, c) in enumerate(zip(stage_depths(swin), stage_dims(swin), strict=True))
    ]


def swin_prompt_count(swin: SwinTransformer, num_tokens: int, deep: bool) -> int:
    """Prompt parameters: p·C0 (shallow) or p·Σ depth_s·C_s (deep: 12,032·p on Swin-B)."""
    dims, depths = stage_dims(swin), stage_depths(swin)
    return num_tokens * (sum(d * c for d, c in zip(depths, dims, strict=True)) if deep else dims[0])


def rel_pos_bias(attn: WindowAttention) -> Tensor:
    """The window attention's relative-position bias [heads, area, area], read from its table and index."""
    area = attn.window_size[0] * attn.window_size[1]
    table = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    return table.view(area, area, -1).permute(2, 0, 1)


def prompted_window_attention(
    attn: WindowAttention, x: Tensor, shift_mask: Tensor | None, num_prompts: int, extra: ExtraKV = None
) -> Tensor:
    """timm's window attention on windows [nW·B, p + area, C] whose first p tokens are prompts.

    The bias and the shift mask [nW, area, area] get p zero rows and columns in front (prompts see, and are seen
    by, every patch of the window, with bias 0); `extra(nW·B)` keys/values are prepended with zero columns.
    """
    B_, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    pad = (num_prompts, 0, num_prompts, 0)
    mask = F.pad(rel_pos_bias(attn), pad).unsqueeze(0)  # [1, heads, N, N]
    if shift_mask is not None:
        nW = shift_mask.shape[0]
        shifted = F.pad(shift_mask, pad).to(mask.dtype)  # [nW, N, N]: windows are batch-major (image, window)
        mask = (mask.unsqueeze(0) + shifted[None, :, None]).expand(B_ // nW, -1, -1, -1, -1)
        mask = mask.reshape(B_, attn.num_heads, N, N)
    if extra is not None:
        k, v, mask = prepend_kv(k, v, mask, *extra(B_))
    out = attend(attn, q, k, v, mask.to(q.dtype), training=attn.training)
    out = out.transpose(1, 2).reshape(B_, N, -1)
    return attn.proj_drop(attn.proj(out))


def _replicate(prompts: Tensor, windows: int, order: str) -> Tensor:
    """[B, p, C] -> [nW·B, p, C], paired with the batch-major windows as `order` says (see the module doc)."""
    _, p, C = prompts.shape
    if order == "official":
        return prompts.unsqueeze(0).expand(windows, -1, -1, -1).reshape(-1, p, C)
    return prompts.unsqueeze(1).expand(-1, windows, -1, -1).reshape(-1, p, C)


def _average(prompts: Tensor, batch: int, order: str) -> Tensor:
    """[nW·B, p, C] -> [B, p, C], the mean over windows, in the order `_replicate` used."""
    _, p, C = prompts.shape
    if order == "official":
        return prompts.view(-1, batch, p, C).mean(0)
    return prompts.view(batch, -1, p, C).mean(1)


def prompted_block(
    block: SwinTransformerBlock, x: Tensor, prompts: Tensor, *, order: str, extra: ExtraKV = None
) -> tuple[Tensor, Tensor]:
    """One Swin block on the map x [B, H, W, C] and the prompts [B, p, C]; returns both updated."""
    B, H, W, C = x.shape
    p = prompts.shape[1]
    y, z = block.norm1(x), block.norm1(prompts)
    wh, ww = block.window_size
    shift = block.shift_size
    if any(shift):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    y = F.pad(y, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))  # as timm pads a map windows do not tile
    Hp, Wp = y.shape[1], y.shape[2]
    windows = window_partition(y, block.window_size).view(-1, wh * ww, C)
    nW = windows.shape[0] // B
    tokens = torch.cat([_replicate(z, nW, order), windows], dim=1)
    mask = block.get_attn_mask(y) if getattr(block, "dynamic_mask", False) else block.attn_mask
    out = prompted_window_attention(block.attn, tokens, mask, p, extra)
    z = _average(out[:, :p], B, order)
    y = window_reverse(out[:, p:].reshape(-1, wh, ww, C), block.window_size, Hp, Wp)[:, :H, :W]
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    x = x + block.drop_path1(y)
    prompts = prompts + block.drop_path1(z)
    seq = torch.cat([prompts, x.reshape(B, -1, C)], dim=1)  # norm2 and the MLP act on every token
    seq = seq + block.drop_path2(block.mlp(block.norm2(seq)))
    return seq[:, p:].reshape(B, H, W, C), seq[:, :p]


def prompted_merge(merge: nn.Module, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """A stage's downsampling: timm's PatchMerging on the map, 4 concatenated copies of each prompt through its
    norm and reduction; the identity (stage 0) passes both through."""
    if isinstance(merge, nn.Identity):
        return x, prompts
    if not isinstance(merge, PatchMerging):
        raise TypeError(f"expected timm's PatchMerging, got {type(merge).__name__}")
    return merge(x), merge.reduction(merge.norm(torch.cat([prompts] * 4, dim=-1)))


class SwinPrompts(TunableModule):
    """VPT's Swin prompts: `input` [p, C0] and, when deep, one tensor per stage (`deep_prompt_shapes`), all
    U(-bound, bound). Dropout as the official code draws it: on the input prompt expanded to the batch (a mask per
    sample), and on each stage's whole deep tensor at the start of the stage (shared by the batch)."""

    def __init__(self, swin: SwinTransformer, num_tokens: int, *, deep: bool, dropout: float) -> None:
        super().__init__()
        bound = swin_prompt_init_bound(swin)
        self.input = nn.Parameter(torch.empty(num_tokens, stage_dims(swin)[0]).uniform_(-bound, bound))
        shapes = deep_prompt_shapes(swin, num_tokens) if deep else []
        self.deep = nn.ParameterList([nn.Parameter(torch.empty(s).uniform_(-bound, bound)) for s in shapes])
        self.dropout = nn.Dropout(dropout)

    def first(self, batch: int) -> Tensor:
        """The input prompts [batch, p, C0]."""
        return self.dropout(self.input.expand(batch, -1, -1))

    def stage(self, s: int) -> Tensor:
        """Stage s's deep prompts [blocks, p, C_s] (after dropout)."""
        return self.dropout(self.deep[s])


class PromptedSwin(PeftModel):
    """VPT-shallow or VPT-deep on timm's Swin (see the module doc). The backbone stays in eval mode, as the
    official `train()` forces (drop-path off). Subclasses may change the input prompts (`input_prompts`) and add
    extra keys/values per block (`block_kv`)."""

    def __init__(
        self, backbone: SwinTransformer, num_classes: int, *, num_tokens: int, deep: bool, dropout: float,
        head_init: str, pool: str = "all", window_order: str = "official",
    ) -> None:  # fmt: skip
        super().__init__(backbone, num_classes, head_init=head_init)
        if pool not in POOLS or window_order not in WINDOW_ORDERS:
            raise ValueError(f"pool must be one of {POOLS} and window_order one of {WINDOW_ORDERS}")
        self.deep, self.pool, self.window_order = deep, pool, window_order
        self.prompts = SwinPrompts(backbone, num_tokens, deep=deep, dropout=dropout)
        self.backbone.eval()

    def train(self, mode: bool = True) -> PromptedSwin:
        super().train(mode)
        self.backbone.eval()
        return self

    def input_prompts(self, batch: int) -> Tensor:
        """The prompts entering the first block: [batch, p, C0]."""
        return self.prompts.first(batch)

    def block_kv(self, stage: int, index: int) -> ExtraKV:
        """Extra keys/values for a block's window attention (none here)."""
        return None

    def forward_features(self, x: Tensor) -> Tensor:
        swin = self.backbone
        x = swin.patch_embed(x)  # [B, H, W, C0]
        B = x.shape[0]
        prompts = self.input_prompts(B).to(x.dtype).expand(B, -1, -1)
        for s, stage in enumerate(swin.layers):
            x, prompts = prompted_merge(stage.downsample, x, prompts)
            deep = self.prompts.stage(s) if self.deep else None
            for i, block in enumerate(stage.blocks):
                if deep is not None and (s, i) != (0, 0):
                    prompts = deep[i - 1 if s == 0 else i].to(x.dtype).expand(B, -1, -1)
                x, prompts = prompted_block(block, x, prompts, order=self.window_order, extra=self.block_kv(s, i))
        x, prompts = swin.norm(x), swin.norm(prompts)
        if self.pool == "image":
            return swin.forward_head(x, pre_logits=True)
        return torch.cat([prompts, x.flatten(1, 2)], dim=1).mean(1)
