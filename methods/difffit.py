"""DiffFit: BitFit plus the LayerNorm weights plus a learnable scale γ on every residual branch.

Xie et al., "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple Parameter-Efficient
Fine-Tuning", ICCV 2023, https://arxiv.org/abs/2304.06648. Designed for DiT; no official vision code. The port to
ViT read here is PETL_Vision's (OSU-MLB/PETL_Vision 245d262, `model/block.py` `difffit_gamma1/2`,
`experiment/build_model.py`, `experiment/config/method/difffit.yml`), the code behind the reference row.

What trains (PETL_Vision: every parameter whose name contains "bias", "norm" or "difffit"), here found by structure:
- every bias of the backbone, as BitFit selects them (`methods/bitfit.py`: Linear, Conv2d and LayerNorm biases):
  102,912 on ViT-B/16;
- every LayerNorm weight (`methods/ln_tune.py`'s selection, weights only: the biases are already above):
  25 · 768 = 19,200;
- per block two vectors γ₁, γ₂ ∈ R^D, initialised to 1 (`torch.ones`): 24 · 768 = 18,432.
Total 140,544 on ViT-B/16 (PETL_Vision logs 140,544 for every task).

Placement (PETL_Vision's `BlockPETL.forward`): x ← x + γ₁ ⊙ DP(LS₁(Attn(LN₁(x)))), x ← x + γ₂ ⊙ DP(LS₂(MLP(LN₂(x)))):
γ multiplies the branch after its layer scale and drop-path. Here γ is attached to the output of `attn.proj` and
`mlp.fc2` (a `Wrapped` Linear), the last linear map of each branch. That is the same function, forward and
backward, in training too: the dropout after the projection, the layer scale and the drop-path are each a
per-channel or per-sample scaling, which commute with a per-channel γ, and the drop-path draws its mask at the
same point of the random stream. It folds exactly into the rows of proj and fc2 (weights and biases),
so `merged_backbone` is a plain timm model. γ = 1 at initialisation: the model starts as the identity.

On Swin the same selection (BitFit's 137,216 biases, 28,800 LayerNorm weights) and a γ pair of the stage's width
per block (2 · 12,032), 190,080 on Swin-B; the window shift and partition are permutations of positions, so γ
on `attn.proj` is γ on the branch there too.

Recipe: PETL_Vision's grid (lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}, AdamW batch 64, drop-path 0.1, head as
timm's `reset_classifier`) with the shared schedule of `methods/_petl_recipe.py`. Weight decay: the suite's rule,
as BitFit's (timm's: no vector decayed); PETL_Vision decays every trainable tensor, γ included (`decay_all=true`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods._base import ParamReport, PeftModel, TunableModule
from methods._family import Backbone, backbone_report
from methods._inject import Wrapped, replace_module
from methods._inject_swin import block_widths, family_blocks
from methods._merge import merge_backbone
from methods._registry import register_method
from methods.bitfit import Biases, BitFitConfig
from methods.ln_tune import LayerNormAffine, VectorTuningConfig, VectorTuningModel, layer_norm_count

# The last Linear of each residual branch, whose output γ₁ and γ₂ scale.
BRANCH_OUTPUTS = ("attn.proj", "mlp.fc2")


class BranchScale(TunableModule):
    """γ ⊙ y over the channel (last) dimension, γ initialised to 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, y: Tensor) -> Tensor:
        return y * self.gamma

    def output_affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) for `methods/_merge.py`: a scale without shift."""
        return self.gamma, torch.zeros_like(self.gamma)


class DiffFitModel(VectorTuningModel):
    def __init__(self, backbone: Backbone, num_classes: int, config: DiffFitConfig) -> None:
        super().__init__(backbone, num_classes, config)
        # Selected before the projections are wrapped, so that the keys are the backbone's module paths.
        self.biases = Biases(backbone)
        self.norm_weights = LayerNormAffine(backbone, biases=False)
        for prefix, _, d in family_blocks(backbone):
            for target in BRANCH_OUTPUTS:
                path = f"{prefix}.{target}"
                replace_module(backbone, path, Wrapped(backbone.get_submodule(path), after=BranchScale(d)))

    def merged_backbone(self) -> Backbone:
        return merge_backbone(self.backbone)


@register_method("difffit")
@dataclass
class DiffFitConfig(VectorTuningConfig):
    """DiffFit: biases, LayerNorm weights and a scale per residual branch (140,544 parameters on ViT-B/16).

    Attributes:
        drop_path_rate: the backbone's stochastic depth.
        decay_all: apply weight decay to every trainable tensor, γ, biases and norms included (PETL_Vision's
            `make_optimizer`); false: timm's rule (vectors undecayed), as BitFit.
        head_init: `torch` (timm's `reset_classifier`), `trunc_normal` or `vpt`.
    """

    def check_backbone(self, backbone: Backbone) -> None:
        for prefix, block, _ in family_blocks(backbone):
            for target in BRANCH_OUTPUTS:
                module = block.get_submodule(target)
                if not isinstance(module, nn.Linear) or module.bias is None:
                    raise ValueError(
                        f"difffit scales the output of {prefix}.{target}, which is not a Linear with a bias "
                        f"({type(module).__name__}) in this backbone; pick a timm ViT or Swin"
                    )

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        return DiffFitModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        biases = BitFitConfig().expected_params(backbone, num_classes).tunable  # 102,912 on ViT-B/16
        norm_weights = layer_norm_count(backbone) // 2  # 25 · 768 = 19,200
        gammas = 2 * sum(block_widths(backbone))  # 24 · 768 = 18,432
        return backbone_report(backbone, num_classes, biases + norm_weights + gammas)
