"""Bottleneck adapters in sequence with the frozen sub-blocks: NOAH's Adapter and Houlsby's placement.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, https://arxiv.org/abs/1902.00751.

`adapter` (the VTAB-1k "Adapter" row: NOAH's variant, ZhangYuanhan-AI/NOAH e9c55f3,
`model/module/adapter_super.py`, `Block.forward`): one adapter on the MLP side only, after the MLP and
its drop-path, before the residual add: x ← x + Ad(DP(MLP(LN₂(x)))), Ad(h) = h + W_up dropout(QuickGELU(W_down h
+ b_down)) + b_up, bottleneck 8, dropout 0.1, both weights xavier-uniform and both biases N(0, 1e-6²): the
up-projection is not zero, so the model deliberately does not start at the pretrained function.
2Dh + h + D per adapter, 156,768 on ViT-B/16 (h = 8). It is attached by wrapping the block's `drop_path2`.
Recipe: NOAH's (see `methods/lora.py`): AdamW 1e-3 / 1e-4 with timm's weight-decay rule, drop-path 0.1,
head truncated-normal std 0.02.

`adapter_houlsby` (PETL_Vision 245d262 `rand_h_adapter`, `model/block.py`, `model/adapter.py`): an adapter
after each sub-block, before its drop-path: x ← x + DP(A₁(Attn(LN₁(x)))), x ← x + DP(A₂(MLP(LN₂(x)))),
A(h) = h + s·(W_up dropout(ReLU(W_down h + b)) + b_up), xavier init as above, dropout 0.1, 24·(1537h + 768)
on ViT-B/16. PETL_Vision tunes h ∈ {4, 8, 16, 32} and s ∈ {0.01, 0.1, 1, 10} per task (unpublished
choices): defaults h = 8, s = 1 (the suite's choice); its code applies the drop-path twice on this path,
here once. Houlsby's own paper (near-identity init, LayerNorms tuned) is not reproduced.
Recipe: PETL_Vision's AdamW grid (lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}, drop-path 0.1) with the
shared schedule of `methods/_petl_recipe.py` (PETL_Vision's own schedule is not in the spec).

Neither is re-parameterisable (a non-linear bottleneck): `merged_backbone` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe
from methods._bottleneck import BOTTLENECK_INITS, ResidualBottleneck
from methods._inject import Wrapped, replace_module
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._vit import vit_report
from methods.convpass import QuickGELU

ACTIVATIONS = {"quick_gelu": QuickGELU, "relu": nn.ReLU, "gelu": nn.GELU}


class AdapterModel(PeftModel):
    """Adapters wrapped around the output of `attach` submodules of every block (`Wrapped(after=...)`)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: _AdapterConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        d = backbone.embed_dim
        for i in range(len(backbone.blocks)):
            for target in config.attach:
                adapter = ResidualBottleneck(d, config.hidden, act=ACTIVATIONS[config.activation](),
                                             dropout=config.dropout, init=config.init, scale=config.scale)  # fmt: skip
                path = f"blocks.{i}.{target}"
                replace_module(backbone, path, Wrapped(backbone.get_submodule(path), after=adapter))

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)


@dataclass
class _AdapterConfig(MethodConfig):
    """Sequential bottleneck adapter settings.

    Attributes:
        hidden: bottleneck width h.
        scale: s multiplying the adapter's branch (not its skip connection).
        activation: `quick_gelu` (NOAH), `relu` (PETL_Vision) or `gelu`.
        init: `xavier` (NOAH, PETL_Vision: not identity at init) or `lora` (up-projection zero: identity).
        dropout: dropout on the bottleneck.
        drop_path_rate: the backbone's stochastic depth.
        head_init: `trunc_normal` (NOAH), `torch` or `vpt`.
    """

    identity_at_init: ClassVar[bool] = False  # xavier-initialised up-projection (spec: deliberately not identity)
    attach: ClassVar[tuple[str, ...]]

    recipe: Recipe = field(default_factory=petl_recipe)
    hidden: int = 8
    scale: float = 1.0
    activation: str = "quick_gelu"
    init: str = "xavier"
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "trunc_normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"activation": tuple(ACTIVATIONS), "init": BOTTLENECK_INITS, "head_init": HEAD_INITS})
        _checks.integer(self, "hidden", 1)
        _checks.real(self, "scale")
        _checks.rates(self, "dropout", "drop_path_rate")

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return AdapterModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d, h = backbone.embed_dim, self.hidden
        per_adapter = 2 * d * h + h + d  # 1537h + 768 at D = 768
        return vit_report(backbone, num_classes, len(backbone.blocks) * len(self.attach) * per_adapter)


@register_method("adapter")
@dataclass
class AdapterConfig(_AdapterConfig):
    """NOAH's Adapter: after the MLP and its drop-path in every block (156,768 parameters on ViT-B/16)."""

    attach = ("drop_path2",)


@register_method("adapter_houlsby")
@dataclass
class AdapterHoulsbyConfig(_AdapterConfig):
    """Houlsby placement: after attention and after the MLP, before each drop-path (24·(1537h + 768) on ViT-B/16)."""

    attach = ("attn", "mlp")
    activation: str = "relu"
    head_init: str = "torch"
