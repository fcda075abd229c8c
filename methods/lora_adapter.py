"""LoRA-initialised Pfeiffer adapter: one sequential bottleneck after each block's MLP (PETL_Vision's `lora_p_adapter`).

Not LoRA plus an adapter: PETL_Vision's name for a Pfeiffer-placed adapter with a LoRA-style initialisation.
Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", EACL 2021,
https://arxiv.org/abs/2005.00247 (the MLP-only placement); the code read, and the reference row's, is
OSU-MLB/PETL_Vision 245d262: `experiment/config/method/lora_p_adapter.yml` (`ft_mlp_module: adapter`,
`ft_mlp_mode: sequential_after`, `adapter_init: lora_xavier`), `model/adapter.py`, `model/block.py`,
`model/utils.py:init_weight`.

Function (`BlockPETL.forward`, `sequential_after`, MLP side only; the attention side is untouched):
x ← x + DP(LS₂(A(DP(LS₂(MLP(LN₂(x))))))), A(h) = h + s·(W_up dropout₀.₁(ReLU(W_down h + b_down)) + b_up):
the block's drop-path is applied twice in training, to the MLP output and to the adapter output, each call
drawing its own mask (`drop_path_twice=false`: once, after the adapter; evaluation is the same function).
Layer scale: Identity on the ViT-B/16 presets; on a layer-scaled backbone the official block applies LS₂ twice,
here once, outside the adapter. Built from `methods/adapter.py`'s model and `methods/_bottleneck.py`'s
`ResidualBottleneck` (attached by wrapping each block's `mlp`). Per block 2Dh + h + D: 12 · (1537h + 768) =
156,768 at h = 8 on ViT-B/16. On Swin one adapter per block, of its stage's width: 204,736 on Swin-B.

Initialisation (`init`):
- `lora_xavier` (default): the declared init, as the method is defined (down weight xavier-uniform, up weight
  and both biases zero): the identity at init;
- `petl`: what the official runs actually started from. The adapter declares `lora_xavier` (down weight
  xavier-uniform, up weight and both biases zero), but `VisionTransformerPETL.__init__` ends with timm's
  `init_weights`, which re-initialises every `nn.Linear` of the model after the blocks are built, adapters
  included (`methods/_timm_init.py`): both weights truncated-normal std 0.02, both biases zero. The
  up-projection is not zero, so the model does not start as the identity (as `adapter_houlsby`'s `petl`);
- `lora_kaiming`: down kaiming-uniform(a=√5) instead (PETL_Vision's default `adapter_init`), also the identity.
PETL_Vision's `zero` init (`model/utils.py`) zeroes `down.weight` twice and `up.bias` twice, never `up.weight` or
`down.bias`; `lora_p_adapter` does not use it (and the re-initialisation would overwrite it), so it is not offered.

Options and defaults: PETL_Vision searches h ∈ {4, 8, 16, 32, 64} × s ∈ {0.01, 0.1, 1, 10} per task (unpublished
choices; its logged mean count, 695,333, means h ≈ 37 on average). Defaults h = 8 (the 0.16 M of the spec's count
and of the suite's other bottleneck adapters) and s = 0.1 (`adapter_scaler` of PETL_Vision's default VTAB config
`default_vtab_processed.yml`, and of its ImageNet `lora_p_adapter_32.yml`); both are options. Recipe: PETL_Vision's
AdamW grid (lr {1e-3, 1e-2} × weight decay {1e-4, 1e-3}, batch 64, drop-path 0.1, head as timm's
`reset_classifier`) with the shared schedule of `methods/_petl_recipe.py`, timm's weight-decay rule as
`adapter_houlsby`. Not re-parameterisable (a non-linear bottleneck): `merged_backbone` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods._base import PeftModel
from methods._bottleneck import ResidualBottleneck
from methods._registry import register_method
from methods.adapter import AdapterConfigBase, AdapterModel

LORA_INITS = ("lora_xavier", "lora_kaiming")


class LoraAdapterModel(AdapterModel):
    """NOAH's/Houlsby's sequential adapter model on the MLP side, with the LoRA-style inits set after construction
    (the shared bottleneck declares xavier for every init but `lora`)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: LoraAdapterConfig) -> None:
        super().__init__(backbone, num_classes, config)
        if config.init in LORA_INITS:
            with torch.no_grad():
                for adapter in self.tunable_modules():
                    if not isinstance(adapter, ResidualBottleneck):
                        continue
                    if config.init == "lora_xavier":
                        nn.init.xavier_uniform_(adapter.down.weight)
                    else:
                        adapter.down.reset_parameters()  # kaiming-uniform(a=√5), then the bias is zeroed
                    for tensor in (adapter.down.bias, adapter.up.weight, adapter.up.bias):
                        nn.init.zeros_(tensor)


@register_method("lora_adapter")
@dataclass
class LoraAdapterConfig(AdapterConfigBase):
    """Pfeiffer adapter after each MLP, LoRA-style init (12·(1537h + 768) parameters on ViT-B/16: 156,768 at h = 8).

    Attributes:
        hidden: bottleneck width h (PETL_Vision's grid: 4, 8, 16, 32, 64).
        scale: s multiplying the adapter's output, bias included (grid: 0.01, 0.1, 1, 10).
        init: `lora_xavier` (the declared init: identity at init), `lora_kaiming`, or `petl` (the official ViT's
            re-initialisation after construction: weights truncated-normal std 0.02, biases 0).
        drop_path_twice: in training, also apply the block's drop-path between the MLP and the adapter
            (PETL_Vision's `BlockPETL`); false: once, after the adapter.
    """

    version: ClassVar[int] = 1
    attach = ("mlp",)
    inits = ("petl", *LORA_INITS)
    scale: float = 0.1
    activation: str = "relu"
    init: str = "lora_xavier"
    drop_path_twice: bool = True
    head_init: str = "torch"

    @property
    def identity_at_init(self) -> bool:  # the up-projection is zero under the LoRA-style inits
        return self.init in LORA_INITS

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return LoraAdapterModel(backbone, num_classes, self)
