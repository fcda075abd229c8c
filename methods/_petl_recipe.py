"""The AdamW recipe most PEFT baselines of the VTAB-1k tables were trained with, and timm's weight-decay rule.

NOAH (LoRA, Adapter), PETL-ViT (Convpass, FacT) and RepAdapter share one trainer pattern: AdamW lr 1e-3,
weight decay 1e-4, batch 64 with drop_last, 100 epochs, timm's `CosineLRScheduler` (warm-up 10 epochs
from 1e-6, floor 1e-5) stepped once per epoch after it (the suite's `timm-cosine` schedule). None of
them searched lr or weight decay; the grid used by the suite's `grid` protocol is PETL_Vision's, the one
code base that tuned these baselines on val200: lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from methods._base import PeftModel, Recipe

PETL_VISION_LR_GRID = (1e-3, 1e-2)
PETL_VISION_WD_GRID = (1e-4, 1e-3)


def petl_recipe(**overrides: Any) -> Recipe:
    """The shared AdamW recipe above, with `overrides` (e.g. SSF's lr and weight decay)."""
    settings: dict[str, Any] = dict(
        optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100, warmup_epochs=10,
        warmup_start_lr=1e-6, min_lr=1e-5, schedule="timm-cosine", drop_last=True,
        lr_grid=PETL_VISION_LR_GRID, wd_grid=PETL_VISION_WD_GRID,
    )  # fmt: skip
    settings.update(overrides)
    return Recipe(**settings)


def timm_no_weight_decay(model: PeftModel) -> list[nn.Parameter]:
    """timm's `create_optimizer` rule: every trainable tensor with at most one dimension (biases, norm and
    scale vectors, the head bias) goes without weight decay; matrices and the head weight are decayed."""
    return [p for p in model.trainable_parameters() if p.dim() <= 1]
