"""The backbones of the papers' tables, as presets: what each is, how the suite builds it, and which tables use it.

A preset is matched by its timm name (with or without the pretrained tag where the architecture alone names it);
any other timm ViT or Swin runs as timm builds it. `reference` is the id of the backbone in the reference CSVs'
`backbone` column (`results/reference/`): rows of different backbones are never compared with each other.
`python -m benchmark backbones` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One backbone of the papers' tables.

    Attributes:
        name: the timm name (`arch.tag`) the suite builds.
        reference: its id in the reference CSVs' `backbone` column.
        family: `vit` or `swin`.
        title: how tables print it.
        weights: where the weights come from (the Hub's timm copy, or a file to pass with `--weights`).
        normalization: the input normalisation the papers' code uses (a key of `backbone.NORMALIZATIONS`).
        pooling: how the pre-logits feature is pooled.
        papers: the papers whose tables use it.
        create_kwargs: extra `timm.create_model` arguments of the preset (e.g. MAE's average pooling).
    """

    name: str
    reference: str
    family: str
    title: str
    weights: str
    normalization: str
    pooling: str
    papers: tuple[str, ...]
    create_kwargs: dict[str, Any] = field(default_factory=dict)


PRESETS: tuple[Preset, ...] = (
    Preset(
        name="vit_base_patch16_224.orig_in21k", reference="vit_b16_in21k", family="vit",
        title="ViT-B/16 (ImageNet-21k, supervised)", weights="Hugging Face Hub: timm/vit_base_patch16_224.orig_in21k",
        normalization="imagenet", pooling="CLS token after the final norm",
        papers=("VPT", "E2VPT", "Convpass", "PGN", "NOAH", "SPT", "GPS", "SCT", "DiffFit", "FacT", "SSF", "RepAdapter"),
    ),
    Preset(
        name="swin_base_patch4_window7_224.ms_in22k", reference="swin_b_in22k", family="swin",
        title="Swin-B (ImageNet-22k, supervised)",
        weights="Hugging Face Hub: timm/swin_base_patch4_window7_224.ms_in22k (VPT's swin_base_patch4_window7_224_22k.pth)",
        normalization="imagenet", pooling="average of all tokens after the final norm (prompts included for VPT)",
        papers=("VPT", "E2VPT", "Convpass", "SPT"),
    ),
    Preset(
        name="vit_base_patch16_224.mae", reference="vit_b16_mae", family="vit",
        title="ViT-B/16 (MAE, self-supervised)",
        weights="Hugging Face Hub: timm/vit_base_patch16_224.mae (mae_pretrain_vit_base.pth)",
        normalization="imagenet", pooling="average of patch tokens (and prompts), a fresh identity fc_norm, no CLS",
        papers=("VPT", "E2VPT", "SPT"), create_kwargs={"global_pool": "avg", "fc_norm": True},
    ),
    Preset(
        name="vit_base_patch16_224.mocov3", reference="vit_b16_mocov3", family="vit",
        title="ViT-B/16 (MoCo v3, self-supervised)",
        weights="--weights linear-vit-b-300ep.pth.tar (the official MoCo v3 release; converted on load)",
        normalization="imagenet", pooling="CLS token after the final norm",
        papers=("VPT", "E2VPT", "SPT"),
    ),
)  # fmt: skip


def preset_for(name: str) -> Preset | None:
    """The preset a backbone name selects, or None (any other timm ViT or Swin, built as timm builds it)."""
    for preset in PRESETS:
        if name == preset.name:
            return preset
    return None


def reference_backbone(name: str) -> str | None:
    """The reference CSVs' `backbone` id of the backbone `name` trains on, or None when no paper uses it."""
    preset = preset_for(name)
    return preset.reference if preset else None
