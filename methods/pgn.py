"""PGN: a prompt generation network that writes input-dependent prompts for the frozen ViT.

Loedeman et al., "Prompt Generation Networks for Input-Space Adaptation of Frozen Vision Transformers",
BMVC 2024, https://arxiv.org/abs/2210.06466; official code jochemloedeman/PGN.

A small ResNet (the official "resnet10": 16-channel stem with max-pool, four one-block groups of
16/32/64/128 channels, 1×1 shortcuts with bias, global average pool, Linear(128 → K·N)) reads the image
and outputs K·N logits; a softmax over N gives K convex mixtures of a learned token library [N, D]
(init N(0, 0.02²)). The K prompts are appended after the patch tokens, after the position embedding and
without one of their own. The head is a trainable Linear(D, C) on CLS with PyTorch's default init: the
paper's heads (CLIP zero-shot, frozen DINO prototypes) do not exist for timm's IN-21k ViT, so this is the
suite's setting, not the paper's. Tunable: N·D + 307,312 + 129·K·N (669,808 at K=16, N=128, D=768).

Input-space deployment ("prompt inversion") is the suite's design; the official code has none. The patch
embedding is affine, e(u) = W·u + b, so each library token maps to a pixel patch π_n = W⁺(l_n − b); since
the mixture weights are convex, Σ a_n·l_n = e(Σ a_n·π_n). `to_input_space` swaps the token library for
the pixel library, after which prompts enter the frozen model as pixel patches through its own patch
embedding; the logits are unchanged up to rounding (exact in exact arithmetic when W has full row rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._family import backbone_report
from methods._inject import embed, insert_tokens, pool, remove_tokens, run_blocks
from methods._registry import register_method

GENERATOR_CHANNELS = (16, 32, 64, 128)


class PromptGenerator(nn.Module):
    """The official "resnet10" body plus a Linear(128 → outputs): images [B, 3, H, W] -> logits [B, outputs].

    Built from torchvision's `BasicBlock`; the shortcut of a block that changes shape is a 1×1 conv with
    bias and no norm, as in the official generator (torchvision's own ResNets use a conv without bias + BN).
    Initialisation as the official generator's: every conv weight kaiming-normal (fan_out, ReLU), BatchNorm
    weight 1 and bias 0; the shortcut convs' biases keep PyTorch's default U(-1/√fan_in, 1/√fan_in) (the
    official init touches conv weights only), and so does the output Linear.
    """

    def __init__(self, outputs: int, channels: tuple[int, ...] = GENERATOR_CHANNELS) -> None:
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, c0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )  # fmt: skip
        blocks, inplanes = [], c0
        for i, planes in enumerate(channels):
            stride = 1 if i == 0 else 2
            shortcut = None if stride == 1 and inplanes == planes else nn.Conv2d(inplanes, planes, 1, stride=stride)
            blocks.append(BasicBlock(inplanes, planes, stride=stride, downsample=shortcut))
            inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # the bias keeps its init
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The body's output map, [B, 128, H/32, W/32]."""
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class PGN(TunableModule):
    """Generator plus library: images -> mixture weights [B, K, N] -> K prompts.

    The library is either tokens [N, D] (latent space) or pixel patches [N, C·ph·pw] (input space).
    """

    def __init__(self, num_prompts: int, library_size: int, library_dim: int, resolution: int | None) -> None:
        super().__init__()
        self.num_prompts, self.library_size, self.resolution = num_prompts, library_size, resolution
        self.generator = PromptGenerator(num_prompts * library_size)
        self.library = nn.Parameter(torch.randn(library_size, library_dim) * 0.02)

    def mixture(self, images: Tensor) -> Tensor:
        """Softmax weights [B, K, N]: each row is a convex combination over the library."""
        if self.resolution is not None and images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False)  # fmt: skip
        logits = self.generator(images).view(-1, self.num_prompts, self.library_size)
        return logits.softmax(dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """Prompts [B, K, library_dim]: the mixtures of the library's rows."""
        return self.mixture(images) @ self.library.to(images.dtype)


def _patch_matrix(vit: VisionTransformer) -> tuple[Tensor, Tensor]:
    """The patch embedding as an affine map on flattened patches: W [D, C·ph·pw] and b [D]."""
    pe = vit.patch_embed
    if not isinstance(pe.norm, nn.Identity):
        raise ValueError("input-space prompts need an affine patch embedding (no norm after the projection)")
    weight = pe.proj.weight.flatten(1)  # flattened in (channel, row, column) order, as the conv reads a patch
    bias = pe.proj.bias if pe.proj.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    return weight, bias


class PGNModel(PeftModel):
    """The frozen ViT with PGN prompts appended after the patch tokens."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: PGNConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        ph, pw = backbone.patch_embed.patch_size
        self.input_space = config.input_space
        dim = backbone.patch_embed.proj.in_channels * ph * pw if config.input_space else backbone.embed_dim
        self.pgn = PGN(config.num_prompts, config.library_size, dim, config.generator_resolution)

    def prompts(self, images: Tensor) -> Tensor:
        """Prompt tokens [B, K, D]; in input space, pixel patches passed through the frozen patch embedding."""
        prompts = self.pgn(images)
        if not self.input_space:
            return prompts
        proj = self.backbone.patch_embed.proj
        B, K, _ = prompts.shape
        patches = prompts.reshape(B * K, proj.in_channels, *proj.kernel_size)  # one patch = one conv window
        return proj(patches).reshape(B, K, -1)

    def forward_features(self, x: Tensor) -> Tensor:
        prompts = self.prompts(x)
        tokens = embed(self.backbone, x)
        n = tokens.shape[1]
        tokens = run_blocks(self.backbone, insert_tokens(tokens, prompts, n), lambda i, t: t)
        return pool(self.backbone, remove_tokens(tokens, n, prompts.shape[1]))

    @torch.no_grad()
    def to_input_space(self) -> dict[str, float]:
        """Replace the token library by pixel patches π_n = W⁺(l_n − b); returns cond(W) and the residual.

        Solved in float64 with the pseudo-inverse, which is the exact inverse for a square invertible W
        (ViT-B/16: 768 = 3·16·16) and a right inverse for a wide full-rank one.
        """
        if self.input_space:
            raise ValueError("this PGN is already in input space")
        weight, bias = (t.double() for t in _patch_matrix(self.backbone))
        library = self.pgn.library.double()
        pixels = (library - bias) @ torch.linalg.pinv(weight).T  # [N, C·ph·pw]
        residual = (pixels @ weight.T + bias - library).abs().max().item()
        self.pgn.library = nn.Parameter(
            pixels.to(self.pgn.library.dtype), requires_grad=self.pgn.library.requires_grad
        )
        self.input_space = True
        return {"cond": torch.linalg.cond(weight).item(), "max_residual": residual}

    def export_input_space(self, path: str | Path) -> None:
        """Save a deployed (input-space) PGN: generator, pixel library and head, as safetensors."""
        if not self.input_space:
            raise ValueError("call to_input_space() first")
        self.save_tunable(path, metadata={"method": "pgn", "space": "input"})


@register_method("pgn")
@dataclass
class PGNConfig(MethodConfig):
    """PGN settings.

    Attributes:
        num_prompts: K, prompts per image.
        library_size: N, tokens in the library.
        generator_resolution: side the generator's input is resized to (bilinear); None keeps the
            backbone's input size (224 for ViT-B/16, the official setting).
        input_space: build the deployed form, whose library holds pixel patches (see `PGNModel.to_input_space`).
        head_init: `torch` (PyTorch default; project choice) or `vpt`.
    """

    category: ClassVar[str] = "prompt"
    identity_at_init: ClassVar[bool] = False
    needs: ClassVar[str] = (
        "a ViT's token sequence with a position embedding and a CLS token to append its generated prompts to "
        "(a Swin block takes a (B, H, W, C) map)"
    )

    recipe: Recipe = field(
        default_factory=lambda: Recipe(
            optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, batch_size=64, epochs=100, warmup_epochs=50,
            warmup_start_lr=0.0, min_lr=0.001, lr_grid=(0.01, 0.03, 0.1, 0.3), wd_grid=(0.0,),
        )
    )  # fmt: skip
    num_prompts: int = 16
    library_size: int = 128
    generator_resolution: int | None = None
    input_space: bool = False
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.integer(self, "num_prompts", 1)
        _checks.integer(self, "library_size", 1)
        _checks.integer(self, "generator_resolution", 1, none_ok=True)
        _checks.choice(self, "head_init", HEAD_INITS)

    def check_backbone(self, backbone: VisionTransformer) -> None:
        if self.input_space and not isinstance(backbone.patch_embed.norm, nn.Identity):
            raise _checks.invalid(self, "input_space", "needs an affine patch embedding (this one has a norm)", False)

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return PGNModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        ph, pw = backbone.patch_embed.patch_size
        dim = backbone.patch_embed.proj.in_channels * ph * pw if self.input_space else backbone.embed_dim
        k, n = self.num_prompts, self.library_size
        tunable = n * dim + generator_body_params() + (GENERATOR_CHANNELS[-1] + 1) * k * n
        return backbone_report(backbone, num_classes, tunable)


def generator_body_params(channels: tuple[int, ...] = GENERATOR_CHANNELS) -> int:
    """Stem and blocks of the generator, BN affine included (307,312 for 16/32/64/128)."""
    c0 = channels[0]
    total = 3 * c0 * 9 + 2 * c0  # stem conv (no bias) + BN
    inplanes = c0
    for planes in channels:
        total += inplanes * planes * 9 + planes * planes * 9 + 4 * planes  # two 3×3 convs + two BNs
        if inplanes != planes:
            total += inplanes * planes + planes  # 1×1 shortcut with bias
        inplanes = planes
    return total


def load_input_space(path: str | Path, backbone: VisionTransformer, num_classes: int, **options: Any) -> PGNModel:
    """Rebuild a deployed PGN exported by `PGNModel.export_input_space` around `backbone`."""
    state = load_file(str(path))
    library = state["pgn.library"]
    outputs = state["pgn.generator.fc.bias"].shape[0]
    config = PGNConfig(num_prompts=outputs // library.shape[0], library_size=library.shape[0], input_space=True,
                       **options)  # fmt: skip
    model = config.build(backbone, num_classes)
    model.load_tunable_state_dict(state)
    return model
