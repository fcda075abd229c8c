"""Shared ways to attach a method to timm's `VisionTransformer` without forking it or patching its forward.

- `embed` / `run_blocks` / `pool`: timm's own `forward_features` and `forward_head`, in three steps, so a
  method can act on the token sequence between the embedding and each block (the backbone's modules do
  all the work; only the order of calls is written here).
- `insert_tokens`, `replace_tokens`, `remove_tokens`: edit the sequence right after the prefix tokens
  (CLS and any register tokens), where VPT puts its prompts.
- `KVExtendedAttention`: wraps a block's `Attention` and prepends extra per-head tokens to its keys and
  values (queries untouched), through `scaled_dot_product_attention` so fused kernels serve it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def embed(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Images [B, 3, H, W] -> tokens [B, prefix + patches, D]: patch embedding, position embedding, pre-norm."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def run_blocks(vit: VisionTransformer, x: Tensor, before_block: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Every block, with `before_block(i, x)` applied to the sequence entering block i, then the final norm."""
    for i, block in enumerate(vit.blocks):
        x = block(before_block(i, x))
    return vit.norm(x)


def pool(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Normalised tokens [B, L, D] (original tokens only) -> the pooled pre-logits feature [B, D]."""
    return vit.forward_head(x, pre_logits=True)


def insert_tokens(x: Tensor, tokens: Tensor, at: int) -> Tensor:
    """Insert `tokens` [n, D] (shared over the batch) or [B, n, D] at position `at` of `x` [B, L, D]."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at:]], dim=1)


def replace_tokens(x: Tensor, tokens: Tensor, at: int) -> Tensor:
    """Replace positions at..at+n-1 of `x` [B, L, D] with `tokens` [n, D] or [B, n, D]: the old ones are dropped."""
    return insert_tokens(remove_tokens(x, at, tokens.shape[-2]), tokens, at)


def remove_tokens(x: Tensor, at: int, n: int) -> Tensor:
    """Drop positions at..at+n-1 of `x` [B, L, D]."""
    return torch.cat([x[:, :at], x[:, at + n :]], dim=1)


class KVExtendedAttention(nn.Module):
    """A block's attention with extra tokens prepended to its keys and values, per head.

    `extra` is a module whose call returns (keys, values), each [heads, n, head_dim]: they live in the per-head key/value space
    (after the frozen qkv projection and q/k norms) and carry no position. Queries are not extended, so the
    output keeps the input's length. The wrapped attention's own modules (qkv, norms, projection, gate)
    are reused; timm's `Attention.forward` cannot take extra keys, which is why its few lines of head
    splitting and merging are spelled out here.
    """

    def __init__(self, attn: Attention, extra: nn.Module) -> None:
        super().__init__()
        if not isinstance(attn, Attention):
            raise TypeError(f"expected timm's Attention, got {type(attn).__name__}")
        self.attn = attn
        self.extra = extra

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        a = self.attn
        if is_causal:
            raise NotImplementedError("causal attention with extra keys and values is not supported")
        B, N, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)  # [B, heads, N, head_dim]
        extra_k, extra_v = self.extra()  # [heads, n, head_dim]
        n = extra_k.shape[1]
        k = torch.cat([extra_k.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([extra_v.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        if attn_mask is not None:  # the extra keys are visible to every query
            attn_mask = F.pad(attn_mask, (n, 0), value=0.0 if attn_mask.dtype != torch.bool else True)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=a.attn_drop.p if self.training else 0.0, scale=a.scale
        )
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = a.norm(x)
        if gate is not None:
            x = x * gate
        return a.proj_drop(a.proj(x))
