"""Bottleneck adapters in sequence with the frozen sub-blocks: NOAH's Adapter and Houlsby's placement.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, https://arxiv.org/abs/1902.00751.

`adapter` (the VTAB-1k "Adapter" row: NOAH's variant, ZhangYuanhan-AI/NOAH e9c55f3,
`model/module/adapter_super.py`, `Block.forward`): one adapter on the MLP side only, after the MLP and
its drop-path, before the residual add: x ← x + Ad(DP(MLP(LN₂(x)))), Ad(h) = h + W_up dropout(QuickGELU(W_down h
+ b_down)) + b_up, bottleneck 8, dropout 0.1. 2Dh + h + D per adapter, 156,768 on ViT-B/16 (h = 8). It is
attached by wrapping the block's `drop_path2`. Initialisation (`init`):
- `noah` (default): what NOAH's runs started from. The adapter's constructor declares xavier-uniform weights
  and N(0, 1e-6²) biases, but NOAH's `VisionTransformer.__init__` then re-initialises every `nn.Linear`
  (`apply(_init_weights)`, `methods/_timm_init.py`): both weights truncated-normal std 0.02, both biases 0,
  drawn after all blocks are built, in module order (down, then up, block by block);
- `paper`: the constructor's xavier init (`xavier`, the name results of version 1 recorded, is read as it);
- `lora`: down kaiming-uniform, up and biases zero (the identity at init).
Under `noah` and `paper` the up-projection is not zero: the model does not start at the pretrained function.
Recipe: NOAH's (see `methods/lora.py`): AdamW 1e-3 / 1e-4 with timm's weight-decay rule, drop-path 0.1,
head truncated-normal std 0.02.

`adapter_houlsby` (PETL_Vision 245d262 `rand_h_adapter`, `model/block.py`, `model/adapter.py`): an adapter
after each sub-block, before its drop-path: x ← x + DP(A₁(Attn(LN₁(x)))), x ← x + DP(A₂(MLP(LN₂(x)))),
A(h) = h + s·(W_up dropout(ReLU(W_down h + b)) + b_up), dropout 0.1, 24·(1537h + 768) on ViT-B/16.
PETL_Vision tunes h ∈ {4, 8, 16, 32} and s ∈ {0.01, 0.1, 1, 10} per task (unpublished choices): defaults
h = 8, s = 1 (the suite's choice). Houlsby's own paper (near-identity init, LayerNorms tuned) is not
reproduced. By default it follows the code behind PETL_Vision's published row:
- `init=petl`: `VisionTransformerPETL.__init__` ends with timm's `init_weights`, which re-initialises every
  `nn.Linear` after the blocks are built (truncated-normal std 0.02, biases 0), so the "xavier" init its
  adapter declares (`model/utils.py`) never takes effect; `init=paper` keeps that declared xavier init
  (weights xavier-uniform, biases N(0, 1e-6²)); `init=lora` starts at the identity;
- `drop_path_twice=true`: in training its `BlockPETL.forward` (`ft_attn_mode=sequential_after`) applies the
  block's drop-path to the sub-block's output and again to the adapter's, x ← x + DP(A₁(DP(Attn(LN₁(x))))),
  likewise on the MLP side, each call drawing its own mask; `false` applies it once, after the adapter.
  In evaluation the drop-path is the identity, so both give the same function.
Recipe: PETL_Vision's AdamW grid (lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}, drop-path 0.1) with the
shared schedule of `methods/_petl_recipe.py` (PETL_Vision's own schedule is not in the spec).

On Swin (SPT's and SNELL's "Adapter-8" rows) both place their adapters in every block as on a ViT, each of its
stage's width d (2dh + h + d: 8-wide NOAH adapters total 2·8·12,032 + 8·24 + 12,032 = 204,736 on Swin-B); the patch
mergings and the patch embedding get none. Houlsby's attention-side adapter is applied to the attention's output
once windows are merged back (in front of the block's `drop_path1`): it is position-wise, so this is the same
function, and a second drop-path there draws per image as on a ViT.

Neither is re-parameterisable (a non-linear bottleneck): `merged_backbone` says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe
from methods._bottleneck import ResidualBottleneck
from methods._family import Backbone, backbone_report
from methods._inject import Wrapped, replace_module
from methods._inject_swin import block_widths, family_blocks
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._timm_init import reinit_linears
from methods.convpass import QuickGELU

ACTIVATIONS = {"quick_gelu": QuickGELU, "relu": nn.ReLU, "gelu": nn.GELU}
# The drop-path that follows each sub-block an adapter can wrap.
DROP_PATHS = {"attn": "drop_path1", "mlp": "drop_path2"}


class AdapterModel(PeftModel):
    """Adapters wrapped around the output of `attach` submodules of every block (`Wrapped(after=...)`)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: AdapterConfigBase) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        declared = "lora" if config.init == "lora" else "xavier"
        for prefix, block, d in family_blocks(backbone):
            for target in config.attach:
                adapter = ResidualBottleneck(d, config.hidden, act=ACTIVATIONS[config.activation](),
                                             dropout=config.dropout, init=declared, scale=config.scale)  # fmt: skip
                # The block's own drop-path of this sub-block, a second time between it and the adapter.
                twice = getattr(config, "drop_path_twice", False)  # a field of adapter_houlsby only
                drop_path = copy.deepcopy(block.get_submodule(DROP_PATHS[target])) if twice else None
                if target == "attn" and isinstance(block, SwinTransformerBlock):
                    # Swin's attention runs on windows: the adapter goes in front of the block's drop-path, which
                    # sees the whole (B, H, W, C) map (a second drop-path there draws per image, not per window).
                    path = f"{prefix}.{DROP_PATHS[target]}"
                    before = adapter if drop_path is None else nn.Sequential(drop_path, adapter)
                    replace_module(backbone, path, Wrapped(backbone.get_submodule(path), before=before))
                    continue
                path = f"{prefix}.{target}"
                replace_module(
                    backbone, path, Wrapped(backbone.get_submodule(path), after=adapter, drop_path=drop_path)
                )
        if config.init in ("noah", "petl"):  # after every block is built, as the official ViT constructors do
            reinit_linears(self.tunable_modules())

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)


@dataclass
class AdapterConfigBase(MethodConfig):
    """Sequential bottleneck adapter settings.

    Attributes:
        hidden: bottleneck width h.
        scale: s multiplying the adapter's branch (not its skip connection).
        activation: `quick_gelu` (NOAH), `relu` (PETL_Vision) or `gelu`.
        init: `noah` / `petl` (the official ViT's re-initialisation: truncated-normal std 0.02, biases 0),
            `paper` (the adapter's declared xavier init) or `lora` (up-projection zero: identity at init).
        dropout: dropout on the bottleneck.
        drop_path_rate: the backbone's stochastic depth.
        head_init: `trunc_normal` (NOAH), `torch` or `vpt`.
    """

    category: ClassVar[str] = "adapter"
    version: ClassVar[int] = 2  # 2: the official runs' re-initialisation by default (and Houlsby's second drop-path)
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    attach: ClassVar[tuple[str, ...]]
    inits: ClassVar[tuple[str, ...]]

    recipe: Recipe = field(default_factory=petl_recipe)
    hidden: int = 8
    scale: float = 1.0
    activation: str = "quick_gelu"
    init: str = "noah"
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "trunc_normal"

    def __post_init__(self) -> None:
        if self.init == "xavier":  # the declared init's name in results of version 1
            self.init = "paper"
        super().__post_init__()
        self.check_choices({"activation": tuple(ACTIVATIONS), "init": self.inits, "head_init": HEAD_INITS})
        _checks.integer(self, "hidden", 1)
        _checks.real(self, "scale")
        _checks.rates(self, "dropout", "drop_path_rate")

    @property
    def identity_at_init(self) -> bool:  # the up-projection is zero only under the lora init
        return self.init == "lora"

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return AdapterModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        h = self.hidden
        per_block = [len(self.attach) * (2 * d * h + h + d) for d in block_widths(backbone)]  # 1537h + 768 at 768
        return backbone_report(backbone, num_classes, sum(per_block))


@register_method("adapter")
@dataclass
class AdapterConfig(AdapterConfigBase):
    """NOAH's Adapter: after the MLP and its drop-path in every block (156,768 parameters on ViT-B/16)."""

    attach = ("drop_path2",)
    inits = ("noah", "paper", "lora")


@register_method("adapter_houlsby")
@dataclass
class AdapterHoulsbyConfig(AdapterConfigBase):
    """Houlsby placement: after attention and after the MLP, before each drop-path (24·(1537h + 768) on ViT-B/16).

    Attributes:
        drop_path_twice: in training, also apply the sub-block's drop-path between it and its adapter
            (PETL_Vision's `BlockPETL`); false: once, after the adapter.
    """

    attach = ("attn", "mlp")
    inits = ("petl", "paper", "lora")
    activation: str = "relu"
    init: str = "petl"
    drop_path_twice: bool = True
    head_init: str = "torch"
