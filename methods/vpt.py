"""VPT: Visual Prompt Tuning, shallow and deep.

Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119; official code KMnP/vpt.

p learnable prompt tokens are inserted right after CLS (after the position embedding, with none of their
own). Shallow: inserted once, their outputs flow through every block. Deep: before every block the
prompt positions are discarded and replaced by that layer's prompt tensor. Prompt entries ~ U(-v, v) with
v = sqrt(6 / (3·patch² + D)) (0.0625 for ViT-B/16); prompt dropout on every insertion (0.1 deep, 0
shallow), a mask per sample drawn as the official code draws it; the backbone's own dropout is off.
Tunable: 12·p·D (deep) or p·D (shallow).

On Swin (`methods/_swin_prompts.py`, the official `PromptedSwinTransformer`): p prompts of the stage-0 width beside
the feature map, replicated into every window, four copies through each patch merging, deep prompts per stage
replacing them before every block but the first; U(-v, v) with v = sqrt(6 / (3·patch² + C0)) (0.1846 on Swin-B).
Tunable: p·C0 (shallow, 128·p on Swin-B) or p·Σ depth_s·C_s (deep, 12,032·p on Swin-B).

Pooling (`pool`): `all` averages the prompts with the other tokens where the backbone averages tokens (the
official Swin `avgpool`, and VPT's MAE pooling); `image` removes them first. With CLS pooling both are the same.

Per-task prompt lengths: the deep list of the suite's spec, confirmed for dmlab, sun397, eurosat and
svhn and unconfirmed for the rest; the same list is the shallow default (VPT's shallow lengths are
unknown). Per-task batch sizes and learning rates: the four confirmed points; elsewhere batch 64 and
base lr 1.0 / weight decay 1e-3 (the dmlab and eurosat values) until the grid protocol tunes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report, family
from methods._inject import embed, insert_tokens, pool, remove_tokens, replace_tokens, run_blocks
from methods._per_task import PerTaskSettings
from methods._registry import register_method
from methods._swin_prompts import POOLS, WINDOW_ORDERS, PromptedSwin, swin_prompt_count

VPT_BASE_LRS = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)
VPT_WDS = (0.01, 1e-3, 1e-4, 0.0)

# VPT-deep prompt lengths per task (spec §4; confirmed: dmlab, sun397, eurosat, svhn).
VPT_DEEP_TOKENS = {
    "cifar100": 10, "caltech101": 10, "dtd": 10, "flowers102": 1, "pets": 1, "svhn": 50, "sun397": 5,
    "camelyon": 100, "eurosat": 100, "resisc45": 10, "retinopathy": 1, "clevr_count": 100, "clevr_dist": 200,
    "dmlab": 100, "kitti": 100, "dsprites_loc": 100, "dsprites_ori": 100, "smallnorb_azi": 200, "smallnorb_ele": 200,
}  # fmt: skip
# (batch, base lr, weight decay) confirmed per task (spec §4); base lr is per 256 images.
VPT_CONFIRMED_RECIPES = {
    "dmlab": (64, 1.0, 1e-3), "sun397": (128, 25.0, 1e-4), "eurosat": (64, 1.0, 1e-3), "svhn": (128, 2.5, 0.0),
}  # fmt: skip
VPT_DEFAULT_RECIPE = (64, 1.0, 1e-3)
# FGVC (`docs/data.md`, FGVC grids): the prompt configs' batch of 128 and `tune_fgvc.py`'s prompt grid (VTAB's
# without 0.05), the same weight decays. Per-dataset prompt lengths are not in the specs: the config's
# `num_tokens` applies (an option, `--set num_tokens=`).
VPT_FGVC_BASE_LRS = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1)
FGVC_TASK_IDS = ("cub", "nabirds", "oxfordflowers", "stanforddogs", "stanfordcars")
VPT_FGVC_RECIPE = (128, 1.0, 1e-3)


def vpt_recipe(batch_size: int, base_lr: float, weight_decay: float, base_lrs: tuple[float, ...] = VPT_BASE_LRS
               ) -> Recipe:  # fmt: skip
    """VPT's SGD recipe: lr = base × batch/256, warm-up 10 epochs from 0, cosine, 100 epochs, its lr × wd grid."""
    return Recipe(
        optimizer="sgd", lr=base_lr * batch_size / 256, weight_decay=weight_decay, batch_size=batch_size,
        epochs=100, warmup_epochs=10, lr_grid=tuple(b * batch_size / 256 for b in base_lrs), wd_grid=VPT_WDS,
    )  # fmt: skip


def vpt_task_recipe(task_id: str, confirmed: dict[str, tuple[int, float, float]] | None = None) -> Recipe:
    """The VPT recipe of one task: FGVC's for an FGVC dataset, else the confirmed VTAB-1k one or the default."""
    if task_id in FGVC_TASK_IDS:
        return vpt_recipe(*VPT_FGVC_RECIPE, VPT_FGVC_BASE_LRS)
    return vpt_recipe(*(confirmed or {}).get(task_id, VPT_DEFAULT_RECIPE))


def prompt_init_bound(vit: VisionTransformer) -> float:
    """VPT's uniform bound sqrt(6 / (in_chans·patch_h·patch_w + D)): xavier-uniform for a patch-sized filter."""
    proj = vit.patch_embed.proj
    ph, pw = vit.patch_embed.patch_size
    return math.sqrt(6.0 / (proj.in_channels * ph * pw + vit.embed_dim))


class Prompts(TunableModule):
    """Prompt tokens for one or several layers: `prompts` [layers, p, D], with dropout on each use.

    Dropout draws a mask per sample: as the official code, it is applied to the prompt expanded to the batch,
    [B, p, D], so the masks are the official ones for the same random state (same draws, same order).
    """

    def __init__(self, layers: int, num_tokens: int, dim: int, bound: float, dropout: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, layer: int, batch: int) -> Tensor:
        """Layer `layer`'s prompt: [p, D], shared by the batch, when dropout does not act; else [batch, p, D]."""
        prompt = self.prompts[layer]
        if not self.training or self.dropout.p == 0.0:
            return prompt
        return self.dropout(prompt.expand(batch, -1, -1))


class PromptedViT(PeftModel):
    """VPT's token flow: prompts after the prefix tokens, inserted once (shallow) or replaced per block (deep).

    Subclasses may reshape what a layer's prompt is through `layer_prompt`.
    """

    def __init__(
        self, backbone: VisionTransformer, num_classes: int, *, num_tokens: int, deep: bool, dropout: float,
        head_init: str, pool: str = "image",
    ) -> None:  # fmt: skip
        super().__init__(backbone, num_classes, head_init=head_init)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.deep = deep
        self.pool = pool
        layers = len(backbone.blocks) if deep else 1
        self.prompts = Prompts(layers, num_tokens, backbone.embed_dim, prompt_init_bound(backbone), dropout)

    def layer_prompt(self, layer: int, batch: int) -> Tensor:
        """The prompt tokens entering block `layer` (deep), or block 0 (shallow), for a batch of `batch` images:
        [n, D] when shared by the batch, [batch, n, D] when each sample has its own (dropout in training)."""
        return self.prompts(layer, batch)

    def forward_features(self, x: Tensor) -> Tensor:
        at = self.backbone.num_prefix_tokens
        n = 0  # prompt tokens in the sequence; every layer's prompt has the same length

        def before_block(i: int, x: Tensor) -> Tensor:
            nonlocal n
            if i == 0:
                prompt = self.layer_prompt(0, x.shape[0])
                n = prompt.shape[-2]
                return insert_tokens(x, prompt, at)
            return replace_tokens(x, self.layer_prompt(i, x.shape[0]), at) if self.deep else x

        x = run_blocks(self.backbone, embed(self.backbone, x), before_block)
        # `image`: pooling sees only the backbone's own tokens; `all`: average pooling takes the prompts in too
        # (they sit after the prefix tokens). CLS pooling ignores prompts either way.
        return pool(self.backbone, remove_tokens(x, at, n) if self.pool == "image" else x)


@dataclass
class _VPTConfig(PerTaskSettings, MethodConfig):
    """VPT settings shared by the shallow and deep variants.

    Attributes:
        num_tokens: prompt length p (per-task default from the spec's deep list; see `for_task`).
        dropout: prompt dropout on every insertion.
        head_init: `vpt` (kaiming-normal fan_out, bias -4.5951) or `torch`.
        per_task: apply the per-task prompt length and recipe in `for_task`.
        pool: `all` (prompts averaged with the other tokens where the backbone averages tokens, as VPT's code) or
            `image` (prompts removed before pooling).
        window_order: Swin only: `official` (the official code's pairing of prompts with windows, which mixes the
            images of a batch; see `methods/_swin_prompts.py`) or `per_sample`.
    """

    category: ClassVar[str] = "prompt"
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    deep: ClassVar[bool]
    recipe: Recipe = field(default_factory=lambda: vpt_recipe(*VPT_DEFAULT_RECIPE))
    num_tokens: int = 10
    dropout: float = 0.1
    head_init: str = "vpt"
    per_task: bool = True
    pool: str = "all"
    window_order: str = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.integer(self, "num_tokens", 1)
        _checks.rates(self, "dropout")
        self.check_choices({"head_init": HEAD_INITS, "pool": POOLS, "window_order": WINDOW_ORDERS})

    def task_values(self, task_id: str) -> dict[str, Any]:
        recipe = vpt_task_recipe(task_id, VPT_CONFIRMED_RECIPES)
        return {"num_tokens": VPT_DEEP_TOKENS.get(task_id, self.num_tokens), "recipe": recipe}

    @classmethod
    def tiny(cls) -> Self:
        return cls(num_tokens=3)

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        kwargs = dict(num_tokens=self.num_tokens, deep=self.deep, dropout=self.dropout, head_init=self.head_init,
                      pool=self.pool)  # fmt: skip
        if isinstance(backbone, SwinTransformer):
            return PromptedSwin(backbone, num_classes, window_order=self.window_order, **kwargs)
        return PromptedViT(backbone, num_classes, **kwargs)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        if family(backbone) == "swin":  # 12,032·p (deep) / 128·p (shallow) on Swin-B
            return backbone_report(backbone, num_classes, swin_prompt_count(backbone, self.num_tokens, self.deep))
        layers = len(backbone.blocks) if self.deep else 1
        tunable = layers * self.num_tokens * backbone.embed_dim  # 9,216·p (deep) / 768·p (shallow) on ViT-B/16
        return backbone_report(backbone, num_classes, tunable)


@register_method("vpt_deep")
@dataclass
class VPTDeepConfig(_VPTConfig):
    """VPT-deep: a prompt tensor per block, replacing the previous block's prompt outputs."""

    deep = True
    dropout: float = 0.1


@register_method("vpt_shallow")
@dataclass
class VPTShallowConfig(_VPTConfig):
    """VPT-shallow: one prompt tensor inserted before the first block."""

    deep = False
    dropout: float = 0.0
