"""LoRA on the fused qkv projection, as NOAH ran it for the VTAB-1k tables (and the q,v-slice variant).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, https://arxiv.org/abs/2106.09685;
the VTAB-1k row comes from NOAH's implementation (ZhangYuanhan-AI/NOAH e9c55f3,
`model/supernet_vision_transformer_timm.py`, `experiments/LoRA/ViT-B_prompt_lora_8.yaml`).

`targets=qkv` (default, NOAH): one pair per block on the whole fused qkv output,
qkv(x) ← W x + b + scale · B A dropout(x), A: D → r, B: r → 3D, scale 1,
dropout 0.1 on the branch input: 3·D·r + D·r per block, 294,912 on ViT-B/16 at r = 8.
`targets=q,v`: two pairs per block, added to the q rows [0, D) and the v rows [2D, 3D) of qkv; the k slice
is the frozen one, bit for bit. Same count (2·2·D·r per block), scale α/r (α = r unless set: scale 1).
Both fold into the qkv weight (`merged_backbone`).

On Swin (SPT's and SNELL's "LoRA-8" rows): the same pairs on every block's window-attention qkv, sized by its
stage's width d (4·d·r per block: 385,024 on Swin-B at r = 8, Σd = 2·128 + 2·256 + 18·512 + 2·1024 = 12,032);
the patch embedding and the patch mergings' reduction Linears are left frozen, as the ViT's patch embedding is.

`init=noah` (default): NOAH's effective initialisation. Its `VisionTransformer.__init__` ends with
`apply(_init_weights)`, which re-initialises every `nn.Linear` after the blocks are built, LoRA's A and B
included (`methods/_timm_init.py`): the runs behind NOAH's table start from A, B ~ N(0, 0.02²) (timm's
`trunc_normal_`, bounds ±2), so the model is not the pretrained function at init. Here the branches are
built as `paper` says, then each A and B (block by block, pair by pair) is re-drawn after all blocks, in
NOAH's order. `init=paper`: the constructor's (and the LoRA paper's) init, A kaiming-uniform(a=√5), B zero:
the identity at init.

Why not HF peft (which the suite's generic `peft` method uses): peft adapts whole modules, so on timm's
fused qkv it can express the NOAH variant but not the q,v-slice one; one module here serves both.

Recipe (NOAH's scripts): AdamW lr 1e-3, weight decay 1e-4 (timm's rule: matrices and the head weight
decayed, 1-D tensors not), batch 64 with drop_last, 100 epochs, timm cosine warm-up 10 from 1e-6 to
1e-5 stepped per epoch, drop-path 0.1, head truncated-normal std 0.02. NOAH reported the best of 11 test
evaluations; the suite reports the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._inject import ParallelLinear, addmm_into, replace_module
from methods._inject_swin import block_widths, family_blocks
from methods._merge import merge_backbone
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._timm_init import reinit_weight

LORA_TARGETS = ("qkv", "q,v")
LORA_INITS = ("noah", "paper")


class LoRA(TunableModule):
    """scale · B A dropout(x) added to output rows `slices` of a Linear (`slices=None`: all of them).

    Each slice has its own pair A_i [r, in], B_i [len_i, r]. For several slices the pairs run as one: the
    stacked A's, then a block matrix of the B's with zero rows outside the slices, so the untouched rows
    receive exactly +0.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, scale: float, dropout: float,
                 slices: list[tuple[int, int]] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.out_features = out_features
        self.slices = slices or [(0, out_features)]
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for start, stop in self.slices:
            a = nn.Linear(in_features, rank, bias=False).weight  # kaiming-uniform(a=√5), as nn.Linear
            self.a.append(nn.Parameter(a.detach()))
            self.b.append(nn.Parameter(torch.zeros(stop - start, rank)))

    def _matrices(self) -> tuple[Tensor, Tensor]:
        """(A [k·r, in], B [out, k·r]) with B block-placed on the slices."""
        if len(self.slices) == 1 and self.slices[0] == (0, self.out_features):
            return self.a[0], self.b[0]
        rank = self.a[0].shape[0]
        rows = []
        at = 0
        for i, ((start, stop), b) in enumerate(zip(self.slices, self.b, strict=True)):
            if start > at:
                rows.append(b.new_zeros(start - at, rank * len(self.slices)))
            rows.append(F.pad(b, (i * rank, (len(self.slices) - 1 - i) * rank)))
            at = stop
        if at < self.out_features:
            rows.append(self.b[0].new_zeros(self.out_features - at, rank * len(self.slices)))
        return torch.cat(list(self.a)), torch.cat(rows)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self._matrices()
        return F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """y + forward(x), the B product accumulating into y."""
        a, b = self._matrices()
        return addmm_into(y, F.linear(self.dropout(x), a), b, self.scale)

    def delta_weight(self) -> Tensor:
        """The [out, in] matrix this branch adds to the Linear's weight: scale · B A."""
        a, b = self._matrices()
        return self.scale * (b @ a)


class LoRAModel(PeftModel):
    """Every block's `attn.qkv` replaced by a `ParallelLinear` holding the frozen qkv and its LoRA branch."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: LoRAConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        for path, block, d in family_blocks(backbone):
            qkv = block.attn.qkv
            slices = None if config.targets == "qkv" else [(0, d), (2 * d, 3 * d)]
            branch = LoRA(qkv.in_features, qkv.out_features, config.rank, scale=config.scale,
                          dropout=config.dropout, slices=slices)  # fmt: skip
            replace_module(backbone, f"{path}.attn.qkv", ParallelLinear(qkv, branch))
        if config.init == "noah":  # after every block is built, as NOAH's `apply(_init_weights)`
            for branch in self.tunable_modules():
                for a, b in zip(branch.a, branch.b, strict=True):
                    reinit_weight(a)
                    reinit_weight(b)

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)

    def merged_backbone(self) -> VisionTransformer:
        return merge_backbone(self.backbone)


@register_method("lora")
@dataclass
class LoRAConfig(MethodConfig):
    """LoRA on qkv (NOAH's variant, 294,912 parameters on ViT-B/16 at r = 8) or on its q and v slices.

    Attributes:
        rank: r.
        targets: `qkv` (one pair on the whole fused qkv, NOAH) or `q,v` (a pair on each of the q and v slices).
        alpha: scale = alpha / rank; None: alpha = rank, scale 1 (NOAH's, and the q,v variant's default).
        dropout: dropout on the branch input.
        init: `noah` (A, B truncated-normal std 0.02, as NOAH's runs started) or `paper` (A kaiming-uniform,
            B zero: the identity at init).
        drop_path_rate: the backbone's stochastic depth.
        head_init: `trunc_normal` (NOAH), `torch` or `vpt`.
    """

    category: ClassVar[str] = "reparam"
    version: ClassVar[int] = 2  # 2: init=noah (NOAH's re-initialised A and B) by default
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=petl_recipe)
    rank: int = 8
    targets: str = "qkv"
    alpha: float | None = None
    dropout: float = 0.1
    init: str = "noah"
    drop_path_rate: float = 0.1
    head_init: str = "trunc_normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"targets": LORA_TARGETS, "init": LORA_INITS, "head_init": HEAD_INITS})
        _checks.integer(self, "rank", 1)
        if self.alpha is not None:  # none: alpha = rank
            _checks.real(self, "alpha", 0.0, low_open=True)
        _checks.rates(self, "dropout", "drop_path_rate")

    @property
    def identity_at_init(self) -> bool:  # B = 0 only under the paper's init
        return self.init == "paper"

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def check_backbone(self, backbone: Backbone) -> None:
        for path, block, d in family_blocks(backbone):
            qkv = block.attn.qkv
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * d:
                raise ValueError(f"lora needs a fused qkv Linear {d} -> {3 * d}; {path} has {qkv}")
        d = min(block_widths(backbone))
        if self.rank > d:
            raise ValueError(f"rank {self.rank} exceeds the width {d}; set rank <= {d}")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return LoRAModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        per_block = [(d + 3 * d) * self.rank for d in block_widths(backbone)]  # 3,072·r at D = 768, both variants
        return backbone_report(backbone, num_classes, sum(per_block))
