"""The re-initialisation that NOAH's and PETL_Vision's ViTs apply after building their blocks.

NOAH's `VisionTransformer.__init__` (`model/supernet_vision_transformer_timm.py`, `apply(_init_weights)`) and
PETL_Vision's `VisionTransformerPETL.__init__` (timm's `init_weights`) end by visiting every module of the
model, the method's own included, in module order, and re-initialising every `nn.Linear`: weight timm's
`trunc_normal_(std=0.02)` (bounds ±2, i.e. ±100 std: in effect N(0, 0.02²)), bias zero. That overwrites the
initialisation the method's constructor declared, so the published runs trained from this one. The frozen
backbone's Linears are loaded from the checkpoint afterwards; only the method's modules keep the new values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.layers import trunc_normal_
from torch import nn

STD = 0.02


@torch.no_grad()
def reinit_linears(modules: Iterable[nn.Module]) -> None:
    """Every `nn.Linear` inside `modules` (in module order): weight truncated-normal std 0.02, bias zero."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                reinit_weight(m.weight, m.bias)


@torch.no_grad()
def reinit_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """One Linear's re-initialisation, for a weight held outside an `nn.Linear` (LoRA's A and B)."""
    trunc_normal_(weight, std=STD)
    if bias is not None:
        nn.init.zeros_(bias)
