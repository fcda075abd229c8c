"""The backbone families a method can attach to: timm's `VisionTransformer` ("vit") and `SwinTransformer` ("swin").

A method's config lists the families it supports (`MethodConfig.families`, ViT only by default); building it on
another family fails with one line naming the method, the family and what the method needs
(`MethodConfig.check_family`). The parameter formulas of both families live beside their facts
(`methods/_vit.py`, `methods/_swin.py`); `backbone_report` is the report every method's formula returns.
"""

from __future__ import annotations

from typing import TypeAlias

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods._report import ParamReport
from methods._swin import swin_param_count
from methods._vit import vit_param_count

Backbone: TypeAlias = VisionTransformer | SwinTransformer

FAMILIES = {"vit": VisionTransformer, "swin": SwinTransformer}
FAMILY_TITLES = {"vit": "ViT", "swin": "Swin"}


def family(backbone: nn.Module) -> str:
    """The family of a backbone ("vit" or "swin"); `TypeError` for any other module."""
    for name, cls in FAMILIES.items():
        if isinstance(backbone, cls):
            return name
    raise TypeError(f"backbone must be a timm VisionTransformer or SwinTransformer, got {type(backbone).__name__}")


def backbone_param_count(backbone: Backbone) -> int:
    """Parameters of a headless backbone, from its architecture (`vit_param_count` or `swin_param_count`)."""
    return vit_param_count(backbone) if family(backbone) == "vit" else swin_param_count(backbone)


def backbone_report(backbone: Backbone, num_classes: int, tunable: int, nonzero: int | None = None) -> ParamReport:
    """The parameter formula's report for a method: its `tunable` count, a Linear(D, C) head ((D + 1)·C: 769·C on
    ViT-B/16, 1025·C on Swin-B) and the backbone by `backbone_param_count`; `nonzero` defaults to `tunable`."""
    return ParamReport(tunable=tunable, head=(backbone.num_features + 1) * num_classes,
                       backbone=backbone_param_count(backbone),
                       nonzero_tunable=tunable if nonzero is None else nonzero)  # fmt: skip
