"""Mlp-3: a 3-layer MLP head on the frozen backbone's pooled feature (VPT's head-oriented baseline).

Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119 (Table 1, "Mlp-k": a k-layer
multilayer perceptron instead of the linear head). Official code read: KMnP/vpt 4410440, `src/models/vit_models.py`
(`ViT.setup_head`: `MLP(input_dim=D, mlp_dims=[D] * MODEL.MLP_NUM + [C], special_bias=True)`; the encoder frozen
as for `linear`) and `src/models/mlp.py` (`MLP`). Mlp-3 is `MLP_NUM = 2`: two hidden layers of width D, then the
final Linear(D, C). Each hidden layer, in the code's order: Linear(D, D) (weight kaiming-normal, fan_out; bias
PyTorch's default), ReLU, BatchNorm1d(D), Dropout(0.1) (the `MLP` defaults, which `setup_head` keeps). The final
layer is VPT's head (kaiming-normal fan_out, bias -4.5951): here the model's `head`, so the suite's head contract
holds; the hidden layers are the method's tunable module. Options: `mlp_num` (hidden layers: Mlp-k is
`mlp_num=k-1`), `dropout`, `norm` (`batch` as the code, `layer` the LayerNorm the code leaves commented, `none`).
Weight decay, as VPT's optimizer applies it: every trainable tensor but the head bias (BatchNorm affines included).

Nothing before the MLP trains, so the pooled features are frozen: the runner computes them once per split and
trains the MLP and the head on them (`features_frozen`; the MLP lives in `forward_head`). Batch norm and dropout
act in training mode only; evaluation uses the running statistics. Not mergeable into the backbone (a non-linear
head), not the identity at initialisation.

Recipe: as `linear` (`methods/baselines.py`): VPT's SGD recipe and its linear grid (base lr 50 ... 0.05 scaled by
batch/256, × weight decay {0.01, 1e-3, 1e-4, 0}); tune_vtab.py has no grid of its own for Mlp-k (a choice).

Parameters: mlp_num·(D² + D + 2D) with batch or layer norm (D² + D without): ViT-B/16 (D = 768) 1,184,256;
Swin-B (D = 1024) 2,103,296 (head (D + 1)·C apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._registry import register_method
from methods.baselines import LINEAR_BASE_LRS, sgd_recipe

NORMS = ("batch", "layer", "none")


class HiddenLayers(TunableModule):
    """`layers` × [Linear(D, D), ReLU, norm, Dropout], VPT's `MLP.projection` (its `last_layer` is the model's head)."""

    def __init__(self, dim: int, layers: int, dropout: float, norm: str) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for _ in range(layers):
            fc = nn.Linear(dim, dim)
            nn.init.kaiming_normal_(fc.weight, a=0, mode="fan_out")
            modules += [fc, nn.ReLU()]
            if norm == "batch":
                modules.append(nn.BatchNorm1d(dim))
            elif norm == "layer":
                modules.append(nn.LayerNorm(dim))
            if dropout > 0:
                modules.append(nn.Dropout(dropout))
        self.projection = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x)


class MLPHead(PeftModel):
    """Frozen backbone; an MLP and the linear head on its pooled feature. The features can be cached."""

    features_frozen = True

    def __init__(self, backbone: Backbone, num_classes: int, config: MLP3Config) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.mlp = HiddenLayers(backbone.num_features, config.mlp_num, config.dropout, config.norm)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(self.mlp(features))


@register_method("mlp_3")
@dataclass
class MLP3Config(MethodConfig):
    """VPT's Mlp-k head (k = 3 by default: two hidden layers and the linear head).

    Attributes:
        mlp_num: hidden layers of width D before the head (VPT's `MODEL.MLP_NUM`; Mlp-k is k - 1).
        dropout: dropout after each hidden layer's norm (VPT's `MLP` default 0.1).
        norm: `batch` (BatchNorm1d, the code's), `layer` or `none`.
        head_init: `vpt` (kaiming-normal fan_out, bias -4.5951), `torch` or `trunc_normal`.
    """

    category: ClassVar[str] = "baseline"
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    model_cls: ClassVar[type[PeftModel]] = MLPHead

    mlp_num: int = 2
    dropout: float = 0.1
    norm: str = "batch"
    head_init: str = "vpt"
    recipe: Recipe = field(default_factory=lambda: sgd_recipe(0.25, 0.0, LINEAR_BASE_LRS))

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.integer(self, "mlp_num", 1)
        _checks.rates(self, "dropout")
        _checks.choice(self, "norm", NORMS)
        _checks.choice(self, "head_init", HEAD_INITS)

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        return MLPHead(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        d = backbone.num_features
        per_layer = d * d + d + (2 * d if self.norm != "none" else 0)
        return backbone_report(backbone, num_classes, self.mlp_num * per_layer)
