"""Convpass: convolutional bypasses beside the frozen ViT's attention and MLP sub-blocks.

Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", arXiv 2207.07039; official
code JieShibo/PETL-ViT (`convpass/vtab`).

Each bypass: Linear(D → 8) → QuickGELU → 3×3 conv over the patch grid (the CLS token through the same
conv as a 1×1 image, so only the kernel's centre tap and the bias act on it) → QuickGELU → dropout 0.1 →
Linear(8 → D) initialised to zero, so the adapted model starts exactly at the pretrained function.
`convpass` puts one beside both sub-blocks of every block, `convpass_attn` beside attention only; each
output is scaled by a fixed per-task s and passes through the block's drop-path (rate 0.1 for the
backbone, linear over depth). The conv starts from xavier-uniform or from an identity on its centre tap,
per task, as the official configs say. Recipe: AdamW 1e-3, weight decay 1e-4 on every trainable tensor,
batch 64 with drop_last, 100 epochs, warm-up 10 from 1e-6, timm cosine to 1e-5 stepped per epoch.

Differences from the official code: the width, hidden size and patch grid come from the backbone (not
768, 8, 14×14); the bypass is attached by wrapping each block (`ParallelBranches`) rather than by
patching its forward; the head is chosen structurally. The official code selected the best of ten test
evaluations; the suite reports the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import backbone_report
from methods._inject import ParallelBranches
from methods._per_task import PerTaskSettings
from methods._registry import register_method

# (s, xavier conv init) per task for convpass and convpass_attn (official configs).
CONVPASS_TASKS = {
    "cifar100": (0.1, False), "caltech101": (1, False), "dtd": (0.01, True), "flowers102": (0.1, True),
    "pets": (1, True), "svhn": (100, True), "sun397": (0.1, False), "camelyon": (10, False),
    "eurosat": (10, False), "resisc45": (10, False), "retinopathy": (1, False), "clevr_count": (1, False),
    "clevr_dist": (0.1, True), "dmlab": (10, False), "kitti": (10, True), "dsprites_loc": (100, True),
    "dsprites_ori": (0.1, True), "smallnorb_azi": (100, True), "smallnorb_ele": (1, True),
}  # fmt: skip
CONVPASS_ATTN_TASKS = {
    "cifar100": (0.1, True), "caltech101": (100, True), "dtd": (0.1, True), "flowers102": (1, True),
    "pets": (1, True), "svhn": (100, True), "sun397": (0.1, True), "camelyon": (10, True),
    "eurosat": (10, True), "resisc45": (100, True), "retinopathy": (0.1, True), "clevr_count": (10, True),
    "clevr_dist": (1, True), "dmlab": (10, True), "kitti": (10, True), "dsprites_loc": (10, True),
    "dsprites_ori": (1, True), "smallnorb_azi": (100, True), "smallnorb_ele": (1, True),
}  # fmt: skip


class QuickGELU(nn.Module):
    """x·sigmoid(1.702·x), the activation of the official Convpass code (its report says GELU)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Convpass(TunableModule):
    """One bypass on tokens [B, prefix + H·W, D] whose patch tokens form an H×W grid in row-major order."""

    def __init__(self, dim: int, grid: tuple[int, int], hidden: int = 8, *, xavier: bool, dropout: float = 0.1):
        super().__init__()
        self.grid = grid
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.conv.bias)
        if xavier:
            nn.init.xavier_uniform_(self.conv.weight)
        else:  # the identity on the centre tap: the conv alone maps its input to itself
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """Tokens [B, L, D] -> the bottleneck after the conv, activation and dropout [B, L, hidden]."""
        B, L, _ = x.shape
        h, w = self.grid
        prefix = L - h * w
        z = self.act(self.down(x))  # [B, L, hidden]
        patches = z[:, prefix:].transpose(1, 2).reshape(B, -1, h, w)  # row-major tokens -> [B, hidden, H, W]
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # [B, H·W, hidden]
        # Each prefix token (CLS) through the same conv as a 1×1 image: only the centre tap and bias act.
        cls = self.conv(z[:, :prefix].reshape(B * prefix, -1, 1, 1)).reshape(B, prefix, -1)
        return self.dropout(self.act(torch.cat([cls, patches], dim=1)))

    def project(self, z: Tensor, factor: Tensor | float = 1.0) -> Tensor:
        """factor · up(z), for a float or per-sample [B, 1, 1] factor, applied on the narrow side: the bias
        becomes one more input column (z, 1) · [W, b]ᵀ, so the D-wide output is written once, by the matmul."""
        if isinstance(factor, float) and factor == 1.0:
            return self.up(z)
        z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1) * factor
        return F.linear(z, torch.cat([self.up.weight, self.up.bias[:, None]], dim=1))


class ConvpassModel(PeftModel):
    """Every block wrapped with Convpass bypasses; the head uses PyTorch's default init."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: _ConvpassConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        grid = tuple(backbone.patch_embed.grid_size)
        dim = backbone.embed_dim

        def bypass() -> Convpass:
            return Convpass(dim, grid, config.hidden, xavier=config.xavier_init, dropout=config.dropout)

        backbone.blocks = nn.Sequential(*[
            ParallelBranches(block, attn_branch=bypass(), mlp_branch=bypass() if config.mlp_side else None,
                             scale=config.scale)
            for block in backbone.blocks
        ])  # fmt: skip

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return []  # the official recipe decays every trainable tensor, biases and head included


def convpass_recipe() -> Recipe:
    return Recipe(
        optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100, warmup_epochs=10,
        warmup_start_lr=1e-6, min_lr=1e-5, schedule="timm-cosine", drop_last=True,
        # Not in the paper (fixed lr and wd there): a small AdamW grid for the suite's grid protocol.
        lr_grid=(5e-3, 1e-3, 5e-4), wd_grid=(1e-4, 1e-3),
    )  # fmt: skip


@dataclass
class _ConvpassConfig(PerTaskSettings, MethodConfig):
    """Convpass settings.

    Attributes:
        scale: the fixed scalar s multiplying every bypass output (per task in `for_task`).
        xavier_init: conv init xavier-uniform (True) or identity on the centre tap (False) (per task).
        hidden: bypass width.
        dropout: dropout inside each bypass.
        drop_path_rate: the backbone's stochastic depth (linear over blocks), applied to the bypasses too.
        head_init: `torch` (PyTorch default, as the official code) or `vpt`.
        per_task: apply the per-task s and conv init in `for_task`.
    """

    category: ClassVar[str] = "adapter"
    identity_at_init: ClassVar[bool] = True
    needs: ClassVar[str] = (
        "a ViT's CLS token and one square patch grid of one width (its bypass reshapes the patch tokens to that "
        "grid and runs CLS as a 1x1 image); Convpass's Swin variant is outside the spec"
    )
    mlp_side: ClassVar[bool]
    task_settings: ClassVar[dict[str, tuple[float, bool]]]

    recipe: Recipe = field(default_factory=convpass_recipe)
    scale: float = 1.0
    xavier_init: bool = True
    hidden: int = 8
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "torch"
    per_task: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.real(self, "scale")
        _checks.integer(self, "hidden", 1)
        _checks.rates(self, "dropout", "drop_path_rate")
        _checks.choice(self, "head_init", HEAD_INITS)

    def check_backbone(self, backbone: VisionTransformer) -> None:
        parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        odd = next((type(b).__name__ for b in backbone.blocks if not all(hasattr(b, n) for n in parts)), None)
        if odd is not None:
            raise ValueError(f"{self.name} needs timm's ViT blocks (norms, attention, MLP, drop-paths); "
                             f"this backbone has {odd}: pick a plain timm ViT")  # fmt: skip

    def task_values(self, task_id: str) -> dict[str, Any]:
        if task_id not in self.task_settings:
            return {}
        scale, xavier = self.task_settings[task_id]
        return {"scale": float(scale), "xavier_init": xavier}

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return ConvpassModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d, h = backbone.embed_dim, self.hidden
        per_module = (2 * h + 1) * d + 9 * h * h + 2 * h  # 13,648 at D = 768, h = 8
        tunable = len(backbone.blocks) * (2 if self.mlp_side else 1) * per_module
        return backbone_report(backbone, num_classes, tunable)


@register_method("convpass")
@dataclass
class ConvpassConfig(_ConvpassConfig):
    """Convpass: bypasses beside attention and MLP in every block (327,552 parameters on ViT-B/16)."""

    mlp_side = True
    task_settings = CONVPASS_TASKS


@register_method("convpass_attn")
@dataclass
class ConvpassAttnConfig(_ConvpassConfig):
    """Convpass-attn: bypasses beside attention only (163,776 parameters on ViT-B/16)."""

    mlp_side = False
    task_settings = CONVPASS_ATTN_TASKS
