"""The two reference points of every PEFT table: the linear probe and full fine-tuning.

Both follow the VPT code that produced their reference numbers (Jia et al., "Visual Prompt Tuning",
ECCV 2022, https://arxiv.org/abs/2203.12119): a Linear(D, C) head on the CLS token after the final
norm, kaiming-normal (fan_out) weight and bias -4.5951, SGD with momentum, warm-up then cosine.
The learning-rate grids are VPT's base grids scaled by batch/256 (the suite's choice: VPT's own
grids for these baselines are unconfirmed).

Both attach to timm's ViT and Swin alike (the head reads the pooled feature: 769·C on ViT-B/16, 1025·C on
Swin-B; full fine-tuning trains every backbone parameter: 85,798,656 and 86,743,224, relative-position bias
tables and patch mergings included, as VPT's Swin "Full" row).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe
from methods._family import backbone_param_count, backbone_report
from methods._registry import register_method

WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
LINEAR_BASE_LRS = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)
FULL_BASE_LRS = (0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 5e-4, 1e-4)


def _scaled(base_lrs: tuple[float, ...], batch_size: int) -> tuple[float, ...]:
    return tuple(lr * batch_size / 256 for lr in base_lrs)


class LinearProbe(PeftModel):
    """Frozen backbone, trained head. Nothing before the head trains, so features can be cached."""

    features_frozen = True

    def tunable_modules(self) -> list[nn.Module]:
        return []

    def merged_backbone(self) -> VisionTransformer:
        return copy.deepcopy(self.backbone).requires_grad_(False)  # nothing to fold in


class FullFinetune(PeftModel):
    """Every backbone weight and the head are trained."""

    def tunable_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def merged_backbone(self) -> VisionTransformer:
        return copy.deepcopy(self.backbone).requires_grad_(False)  # the fine-tuned backbone itself


@dataclass
class _BaselineConfig(MethodConfig):
    """What the two baselines share: a VPT-style head on a model class that decides what trains.

    Attributes:
        head_init: `vpt` (kaiming-normal fan_out, bias -4.5951) or `torch` (PyTorch default).
    """

    category: ClassVar[str] = "baseline"
    model_cls: ClassVar[type[PeftModel]]
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    head_init: str = "vpt"

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.choice(self, "head_init", HEAD_INITS)

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return self.model_cls(backbone, num_classes, head_init=self.head_init)


def sgd_recipe(lr: float, weight_decay: float, base_lrs: tuple[float, ...]) -> Recipe:
    return Recipe(
        optimizer="sgd",
        lr=lr,
        weight_decay=weight_decay,
        batch_size=64,
        epochs=100,
        warmup_epochs=10,
        lr_grid=_scaled(base_lrs, 64),
        wd_grid=WD_GRID,
    )


@register_method("linear")
@dataclass
class LinearConfig(_BaselineConfig):
    """Linear probe: a Linear(D, C) head on the frozen backbone's pooled feature."""

    model_cls = LinearProbe
    recipe: Recipe = field(default_factory=lambda: sgd_recipe(0.25, 0.0, LINEAR_BASE_LRS))

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        return backbone_report(backbone, num_classes, 0)


@register_method("full")
@dataclass
class FullConfig(_BaselineConfig):
    """Full fine-tuning: every backbone weight plus a Linear(D, C) head."""

    model_cls = FullFinetune
    recipe: Recipe = field(default_factory=lambda: sgd_recipe(0.0025, 1e-4, FULL_BASE_LRS))

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        return backbone_report(backbone, num_classes, backbone_param_count(backbone))
