"""Folding a re-parameterisable method back into plain timm modules, for inference at the backbone's cost.

`merge_backbone(vit)` returns a deep copy of `vit` in which every `Wrapped` and `ParallelLinear` of
`methods/_inject.py` is replaced by the plain module it wraps, with the method folded into its weights:

- `ParallelLinear` whose branch has `delta_weight()` [out, in]: W' = W + ΔW (LoRA, FacT);
- `Wrapped(linear, before=R)` where R(z) = M z + m exposes `input_affine() -> (M, m)`: W' = W M,
  b' = W m + b (RepAdapter);
- `Wrapped(module, after=S)` where S(y) = γ ⊙ y + β over channels exposes `output_affine() -> (γ, β)`,
  after a Linear, a LayerNorm or a Conv2d (channels = output features): W' = diag(γ) W, b' = γ ⊙ b + β (SSF).

The same holds for a timm `SwinTransformer` (its Linears and norms are wrapped the same way); a shift after
a Linear without bias (Swin's patch-merging reduction) cannot be folded without changing the architecture.

Folds are computed in float64 and stored in the weights' dtype. Anything else that a method added
(a non-linear branch, prompt tokens) cannot be folded: `NotMergeableError`, naming the module.
"""

from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods._base import NotMergeableError, TunableModule
from methods._inject import ParallelLinear, Wrapped, replace_module


def merge_backbone(vit: VisionTransformer) -> VisionTransformer:
    """A new plain `VisionTransformer` equal in function to `vit` with its wrappers folded in (`vit` unchanged)."""
    merged = copy.deepcopy(vit)
    done: list[str] = []
    with torch.no_grad():
        for name, module in list(merged.named_modules()):
            if any(name.startswith(prefix + ".") for prefix in done):
                continue
            if isinstance(module, ParallelLinear):
                replace_module(merged, name, _fold_branch(module, name))
                done.append(name)
            elif isinstance(module, Wrapped):
                replace_module(merged, name, _fold_wrapped(module, name))
                done.append(name)
    for name, module in merged.named_modules():
        if isinstance(module, TunableModule) or type(module).__module__.startswith("methods."):
            raise NotMergeableError(f"{name} ({type(module).__name__}) cannot be folded into the backbone's weights")
    return merged


def _fold_branch(wrapper: ParallelLinear, name: str) -> nn.Linear:
    if not hasattr(wrapper.branch, "delta_weight"):
        raise NotMergeableError(f"{name}: its branch {type(wrapper.branch).__name__} is not linear")
    linear = wrapper.linear
    linear.weight.copy_((linear.weight.double() + wrapper.branch.delta_weight().double()).to(linear.weight.dtype))
    return linear


def _fold_wrapped(wrapper: Wrapped, name: str) -> nn.Module:
    module = wrapper.module
    if wrapper.before is not None:
        if not hasattr(wrapper.before, "input_affine") or not isinstance(module, nn.Linear):
            raise NotMergeableError(
                f"{name}: {type(wrapper.before).__name__} does not fold into {type(module).__name__}"
            )
        if module.bias is None:
            raise NotMergeableError(f"{name}: the Linear has no bias to take the adapter's shift")
        matrix, shift = (t.double() for t in wrapper.before.input_affine())
        weight = module.weight.double()
        module.bias.copy_((weight @ shift + module.bias.double()).to(module.bias.dtype))
        module.weight.copy_((weight @ matrix).to(module.weight.dtype))
    if wrapper.after is not None:
        if not hasattr(wrapper.after, "output_affine"):
            raise NotMergeableError(f"{name}: {type(wrapper.after).__name__} is not an affine map")
        _fold_output_affine(module, *wrapper.after.output_affine(), name=name)
    return module


def _fold_output_affine(module: nn.Module, scale: Tensor, shift: Tensor, *, name: str) -> None:
    """module(x) ← scale ⊙ module(x) + shift, channel-wise, in place."""
    if isinstance(module, nn.LayerNorm):
        weight, bias = module.weight, module.bias
        if weight is None or bias is None:
            raise NotMergeableError(f"{name}: a LayerNorm without affine parameters cannot take a scale and shift")
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        weight, bias = module.weight, module.bias
        if bias is None:
            raise NotMergeableError(f"{name}: a {type(module).__name__} without bias cannot take a shift")
    else:
        raise NotMergeableError(f"{name}: cannot fold a scale and shift into {type(module).__name__}")
    s, b = scale.double(), shift.double()
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * s.view(view)).to(weight.dtype))
    bias.copy_((bias.double() * s + b).to(bias.dtype))
