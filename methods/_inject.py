"""Shared ways to attach a method to timm's `VisionTransformer` without forking it or patching its forward.

- `embed` / `run_blocks` / `pool`: timm's own `forward_features` and `forward_head`, in three steps, so a
  method can act on the token sequence between the embedding and each block (the backbone's modules do
  all the work; only the order of calls is written here).
- `insert_tokens`, `replace_tokens`, `remove_tokens`: edit the sequence right after the prefix tokens
  (CLS and any register tokens), where VPT puts its prompts.
- `KVExtendedAttention`: wraps a block's `Attention` and prepends extra per-head tokens to its keys and
  values (queries untouched), through `scaled_dot_product_attention` so fused kernels serve it (or the
  explicit softmax when timm's `fused_attn` flag of the wrapped attention is off).
- `ParallelBranches`: wraps a block and adds scaled branches beside its attention and/or MLP sub-blocks (the
  Swin counterpart, and per-block iteration for both families, are in `methods/_inject_swin.py`).
- `replace_module` with `Wrapped` (a module applied to a submodule's input and/or output) and `ParallelLinear`
  (a frozen Linear plus a branch beside it): a submodule of the backbone (`attn.qkv`, `mlp.fc1`, `norm1`,
  `drop_path2`, ...) is swapped for a wrapper that holds it, so the block's own forward calls the wrapper.
  Both can be folded back into a plain module where their branch is affine (`methods/_merge.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
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

    `extra` is a module called with the batch size that returns (keys, values), each [heads, n, head_dim] (shared
    by the batch) or [B, heads, n, head_dim] (per sample, e.g. under dropout): they live in the per-head
    key/value space (after the frozen qkv projection and q/k norms) and carry no position. It is called after
    the qkv projection, where the official E²VPT code draws its key-value dropout. Queries are not extended, so the
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
        k, v, attn_mask = prepend_kv(k, v, attn_mask, *self.extra(B))
        x = attend(a, q, k, v, attn_mask, training=self.training)
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = a.norm(x)
        if gate is not None:
            x = x * gate
        return a.proj_drop(a.proj(x))


def prepend_kv(
    k: Tensor, v: Tensor, mask: Tensor | None, extra_k: Tensor, extra_v: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys and values [B, heads, N, head_dim] with `extra_k`/`extra_v` ([heads, n, head_dim], shared by the batch,
    or [B, heads, n, head_dim]) in front, and the attention mask (float or bool, or None) widened so that every
    query sees the extra keys."""
    B, n = k.shape[0], extra_k.shape[-2]
    k = torch.cat([extra_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([extra_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    if mask is not None:
        mask = F.pad(mask, (n, 0), value=0.0 if mask.dtype != torch.bool else True)
    return k, v, mask


def attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, training: bool) -> Tensor:
    """Softmax attention [B, heads, N, head_dim] with a timm attention module's scale, dropout and `fused_attn` flag:
    `scaled_dot_product_attention` (fused kernels), or the explicit softmax when the flag asks for it (e.g. to
    measure what fusing gains). `mask` is added (float) or selects the visible keys (bool)."""
    if attn.fused_attn:
        p = attn.attn_drop.p if training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=attn.scale)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


class ParallelBranches(nn.Module):
    """A timm `Block` with scaled branches beside its attention and/or MLP sub-blocks.

        x ← x + drop_path1(ls1(attn(norm1(x)))) + scale · drop_path1(attn_branch(norm1(x)))
        x ← x + drop_path2(ls2(mlp(norm2(x))))  + scale · drop_path2(mlp_branch(norm2(x)))

    Each branch reads the same normalised input as its sub-block. The block's own norms, layer-scale,
    drop-path and sub-blocks do the work (each drop-path call draws its own mask); only the two
    residual sums are written here, because timm's `Block.forward` has no place for a second summand.

    A branch with `hidden(y)` and `project(z, factor)` (a bottleneck with its output projection split
    off) gets `scale` and its drop-path mask folded into that projection, on the narrow side: scaling and
    masking its D-wide output instead would cost two more passes over a [B, L, D] tensor, forward and
    backward, in every block. The mask is drawn as timm's `drop_path` draws it, at the same point in the
    random stream, so both forms give the same numbers.

    With `reads_stream`, a branch reads the sub-block's un-normalised input x instead (AdaptFormer's MLP
    branch); with `branch_drop_path` off, the branches skip the drop-path (AdaptFormer's again).
    """

    # What the wrapped block must have (the Swin counterpart is in `methods/_inject_swin.py`).
    block_kind = "ViT Block"
    block_parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(
        self, block: nn.Module, *, attn_branch: nn.Module | None, mlp_branch: nn.Module | None, scale: float,
        reads_stream: bool = False, branch_drop_path: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        for name in self.block_parts:
            if not hasattr(block, name):
                raise TypeError(f"expected a timm {self.block_kind}, {type(block).__name__} has no `{name}`")
        self.block = block
        self.attn_branch = attn_branch
        self.mlp_branch = mlp_branch
        self.scale = scale
        self.reads_stream = reads_stream
        self.branch_drop_path = branch_drop_path

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b = self.block
        y = b.norm1(x)
        out = x + b.drop_path1(b.ls1(b.attn(y, attn_mask=attn_mask, is_causal=is_causal)))
        if self.attn_branch is not None:
            out = out + self._branch(self.attn_branch, b.drop_path1, x if self.reads_stream else y)
        y = b.norm2(out)
        stream = out
        out = out + b.drop_path2(b.ls2(b.mlp(y)))
        if self.mlp_branch is not None:
            out = out + self._branch(self.mlp_branch, b.drop_path2, stream if self.reads_stream else y)
        return out

    def _branch(self, branch: nn.Module, drop_path: nn.Module, y: Tensor) -> Tensor:
        if not hasattr(branch, "project"):
            out = branch(y)
            return self.scale * (drop_path(out) if self.branch_drop_path else out)
        z = branch.hidden(y)
        return branch.project(z, self.scale * (keep_mask(drop_path, z) if self.branch_drop_path else 1.0))


def keep_mask(drop_path: nn.Module, like: Tensor) -> Tensor | float:
    """The per-sample factor a timm `DropPath` would multiply by ([B, 1, …] keep mask / keep probability,
    drawn as timm draws it), or 1.0 when it drops nothing (evaluation, rate 0, `nn.Identity`)."""
    p = getattr(drop_path, "drop_prob", 0.0)
    if not drop_path.training or p == 0.0:
        return 1.0
    keep = 1.0 - p
    mask = like.new_empty((like.shape[0],) + (1,) * (like.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and getattr(drop_path, "scale_by_keep", True):
        mask.div_(keep)
    return mask


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the submodule at dotted `path` (e.g. `blocks.3.attn.qkv`) of `root` is."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class Wrapped(nn.Module):
    """A submodule of the backbone with `before` applied to its input and/or `after` to its output.

    The block keeps calling the submodule by its own name (`norm1`, `attn.qkv`, `drop_path2`, ...), so its
    forward is unchanged; extra positional and keyword arguments (an attention mask) go to the submodule.
    `drop_path` (a timm `DropPath`, or `nn.Identity` at rate 0) is applied to the submodule's output before
    `after`: a second drop-path on that path in training, as PETL_Vision's Houlsby adapter has; it is the
    identity in evaluation, so folding (`methods/_merge.py`) is unaffected by it.
    """

    def __init__(
        self, module: nn.Module, *, before: nn.Module | None = None, after: nn.Module | None = None,
        drop_path: nn.Module | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if drop_path is not None and not isinstance(drop_path, DropPath | nn.Identity):
            raise TypeError(f"drop_path must be a timm DropPath or nn.Identity, got {type(drop_path).__name__}")
        self.module = module
        self.before = before
        self.after = after
        self.drop_path = drop_path

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.before is not None:
            x = self.before(x)
        m = self.module
        if (
            isinstance(m, nn.LayerNorm) and m.weight is not None and hasattr(self.after, "output_affine")
            and self.drop_path is None
        ):  # fmt: skip
            # An affine map after a LayerNorm is a LayerNorm with other affine parameters: one kernel, whose
            # backward yields the gradients of both, instead of two more passes over the tokens.
            scale, shift = self.after.output_affine()
            bias = shift if m.bias is None else torch.addcmul(shift, m.bias, scale)
            return F.layer_norm(x, m.normalized_shape, m.weight * scale, bias, m.eps)
        x = m(x, *args, **kwargs)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return x if self.after is None else self.after(x)


class ParallelLinear(nn.Module):
    """A frozen `nn.Linear` with a branch beside it: y = linear(x) + branch(x), the branch [.., out_features].

    A branch that is linear in x (no bias) exposes `delta_weight()` [out, in], the matrix it adds to the
    weight, and folds into the Linear (`methods/_merge.py`). A branch with `add_to(y, x)` returns y plus
    its output itself (e.g. through `addmm_into`), saving a pass over y.
    """

    def __init__(self, linear: nn.Linear, branch: nn.Module) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self.branch, "add_to"):  # the branch adds itself into the output inside its last matmul
            return self.branch.add_to(self.linear(x), x)
        return self.linear(x) + self.branch(x)


def addmm_into(y: Tensor, z: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """y + alpha · z weightᵀ for y [.., out], z [.., k], weight [out, k], as one matmul that accumulates into y
    (no separate pass over y for the sum)."""
    return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t(), alpha=alpha).view(y.shape)
