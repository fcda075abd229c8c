"""Sidetune: an AlexNet side network blended with the frozen backbone's feature (VPT's baseline).

Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119 (Table 1, "Sidetune", after Zhang
et al., "Side-Tuning", ECCV 2020). Official code read: KMnP/vpt 4410440, `src/models/vit_models.py`
(`ViT.setup_side`, `ViT.forward`, `transfer_type == "side"`):

- side network: torchvision's ImageNet-pretrained AlexNet (`models.alexnet(pretrained=True)`), its `features`
  (five convolutions with ReLU, three max-pools) and `avgpool` (adaptive, 6×6), flattened to 256·6·6 = 9,216;
- projection: Linear(9,216, D) without bias (PyTorch's default init);
- blend: α = sigmoid(a) with a learnable scalar a initialised to 0, so α = 0.5 at initialisation;
  feature = α·backbone feature + (1 − α)·projected side feature, then VPT's linear head;
- trained: the side network (all of it), the projection, a and the head; the encoder is frozen (as for `linear`).
  The side network reads the same normalised image as the backbone (VPT normalises with ImageNet's mean and std,
  AlexNet's own).

The AlexNet layers are written here with torchvision's layout (`features.{0,3,6,8,10}`), so torchvision's
ImageNet weights load into them. They cannot be downloaded by the suite: `side_weights=imagenet` (the code's)
reads torchvision's file `alexnet-owt-7be5be79.pth` from the torch hub cache (`$TORCH_HOME/hub/checkpoints`) and
refuses in one line, naming where to put it, when it is absent; `side_weights=none` keeps PyTorch's default init
(torchvision's AlexNet has no init of its own). A model built on the meta device (parameter counting) loads none.
AlexNet needs images of at least 63 px; `side_image_size` (0: the image as the backbone gets it, as the code)
resizes the side network's input bilinearly first, for tiny test backbones on 32-px images.

Not mergeable, not the identity at initialisation (α = 0.5 mixes in the side feature).

Recipe: as `linear` (`methods/baselines.py`): VPT's SGD recipe and its linear grid; tune_vtab.py has no grid of
its own for side-tuning (a choice). Weight decay, as VPT's optimizer applies it: all trainable tensors (a too)
but the head bias.

Parameters: AlexNet features 2,469,696 (3·64·11² + 64, 64·192·5² + 192, 192·384·3² + 384, 384·256·3² + 256,
256·256·3² + 256) + 9,216·D + 1; ViT-B/16 (D = 768) 9,547,585; Swin-B (D = 1024) 11,906,881 (head apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._registry import register_method
from methods.baselines import LINEAR_BASE_LRS, sgd_recipe

SIDE_WEIGHTS = ("imagenet", "none")
ALEXNET_URL = (
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1
)
# (in channels, out channels, kernel, stride, padding, max-pool after) of AlexNet's five convolutions.
ALEXNET_CONVS = ((3, 64, 11, 4, 2, True), (64, 192, 5, 1, 2, True), (192, 384, 3, 1, 1, False),
                 (384, 256, 3, 1, 1, False), (256, 256, 3, 1, 1, True))  # fmt: skip
ALEXNET_POOL = 6  # adaptive average pool to 6×6
ALEXNET_MIN_SIZE = 63  # the smallest image the three max-pools leave a pixel of
SIDE_FEATURES = ALEXNET_CONVS[-1][1] * ALEXNET_POOL**2  # 9,216
ALEXNET_PARAMS = sum(cin * cout * k * k + cout for cin, cout, k, *_ in ALEXNET_CONVS)  # 2,469,696


def alexnet_weights_path() -> Path:
    """Where torchvision keeps its ImageNet AlexNet weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_URL.rsplit("/", 1)[1]


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional part and adaptive pool, in torchvision's module layout: [B, 3, H, W] -> [B, 9216]."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, k, stride, padding, pool in ALEXNET_CONVS:
            layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((ALEXNET_POOL, ALEXNET_POOL))

    def forward(self, x: Tensor) -> Tensor:
        return self.avgpool(self.features(x)).flatten(1)


class SideNetwork(TunableModule):
    """The side network, its projection to the backbone's width and the blend logit a (α = sigmoid(a))."""

    def __init__(self, dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.net = AlexNetFeatures()
        self.projection = nn.Linear(SIDE_FEATURES, dim, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.projection(self.net(x))


class SideTuned(PeftModel):
    """Frozen backbone; its pooled feature blended with an AlexNet side network's, then the linear head."""

    def __init__(self, backbone: Backbone, num_classes: int, config: SidetuneConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.side = SideNetwork(backbone.num_features, config.side_image_size)
        if config.side_weights == "imagenet" and not next(backbone.parameters()).is_meta:
            load_alexnet(self.side.net)

    def forward_features(self, x: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.side.alpha)
        return alpha * super().forward_features(x) + (1 - alpha) * self.side(x)


def load_alexnet(net: AlexNetFeatures) -> None:
    """Load torchvision's ImageNet AlexNet convolutions (`features.*`) from the torch hub cache, or refuse in one line."""
    path = alexnet_weights_path()
    if not path.is_file():
        raise ValueError(f"side_weights='imagenet' needs torchvision's ImageNet AlexNet weights at {path} (download "
                         f"{ALEXNET_URL} there, or set TORCH_HOME); set side_weights='none' for a random side "
                         "network")  # fmt: skip
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})


@register_method("sidetune")
@dataclass
class SidetuneConfig(MethodConfig):
    """VPT's Sidetune baseline: an AlexNet side network blended with the frozen backbone's feature.

    Attributes:
        side_weights: `imagenet` (torchvision's, read from the torch hub cache; the code's) or `none` (random).
        side_image_size: 0 (the side network reads the backbone's image, as the code) or a size (≥ 63) the side
            network's input is resized to first.
        head_init: `vpt` (kaiming-normal fan_out, bias -4.5951), `torch` or `trunc_normal`.
    """

    category: ClassVar[str] = "baseline"
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    model_cls: ClassVar[type[PeftModel]] = SideTuned

    side_weights: str = "imagenet"
    side_image_size: int = 0
    head_init: str = "vpt"
    recipe: Recipe = field(default_factory=lambda: sgd_recipe(0.25, 0.0, LINEAR_BASE_LRS))

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.choice(self, "side_weights", SIDE_WEIGHTS)
        _checks.integer(self, "side_image_size", 0)
        if 0 < self.side_image_size < ALEXNET_MIN_SIZE:
            raise _checks.invalid(self, "side_image_size", f"is below AlexNet's smallest input, {ALEXNET_MIN_SIZE} px",
                                  ALEXNET_MIN_SIZE + 1)  # fmt: skip
        _checks.choice(self, "head_init", HEAD_INITS)

    @classmethod
    def tiny(cls) -> SidetuneConfig:
        return cls(side_weights="none", side_image_size=64)

    def check_backbone(self, backbone: Backbone) -> None:
        size = getattr(backbone.patch_embed, "img_size", None)
        if self.side_image_size == 0 and size is not None and min(size) < ALEXNET_MIN_SIZE:
            raise _checks.invalid(self, "side_image_size", f"feeds the backbone's {min(size)}-px images to AlexNet, "
                                  f"which needs at least {ALEXNET_MIN_SIZE} px", 64)  # fmt: skip

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        return SideTuned(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        return backbone_report(backbone, num_classes, ALEXNET_PARAMS + SIDE_FEATURES * backbone.num_features + 1)
