"""The backbones of the papers' tables, as presets: what each is, how the suite builds it, and which tables use it.

A preset is matched by its full timm name, tag included (`swin_base_patch4_window7_224` alone is timm's default
tag, the ImageNet-1k fine-tuned weights, not the preset); any other timm ViT or Swin runs as timm builds it. `reference` is the id of the backbone in the reference CSVs'
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
        create_kwargs: extra `timm.create_model` arguments of the preset (e.g. MAE's average pooling); the
            caller's own arguments win.
        checkpoint: the conversion its checkpoints go through before loading (`benchmark.run.checkpoints`):
            `mae` or `mocov3`; None for timm's own layout.
        pretrained_cfg: the pretrained cfg of a tag timm does not know (MoCo v3's, which has no Hub weights), so
            the name resolves without touching timm's registry.
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
    checkpoint: str | None = None
    pretrained_cfg: dict[str, Any] | None = None


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
        papers=("VPT", "E2VPT", "SPT"), create_kwargs={"global_pool": "avg", "fc_norm": True}, checkpoint="mae",
    ),
    Preset(
        name="vit_base_patch16_224.mocov3", reference="vit_b16_mocov3", family="vit",
        title="ViT-B/16 (MoCo v3, self-supervised)",
        weights="--weights linear-vit-b-300ep.pth.tar (the official MoCo v3 release; converted on load)",
        normalization="imagenet", pooling="CLS token after the final norm",
        papers=("VPT", "E2VPT", "SPT"), checkpoint="mocov3",
        pretrained_cfg={
            "num_classes": 0, "input_size": (3, 224, 224),
            "interpolation": "bicubic", "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "license": "cc-by-nc-4.0", "origin_url": "https://github.com/facebookresearch/moco-v3",
            "paper_ids": "arXiv:2104.02057",
        },
    ),
)  # fmt: skip


def preset_for(name: str) -> Preset | None:
    """The preset a backbone name selects, or None (any other timm ViT or Swin, built as timm builds it)."""
    for preset in PRESETS:
        if name == preset.name:
            return preset
    return None


def pretrained_cfg(name: str) -> Any:
    """timm's `PretrainedCfg` of `name`: the preset's own for a tag timm does not know (MoCo v3), else timm's
    (None for an architecture without pretrained cfgs)."""
    import timm
    from timm.models import PretrainedCfg

    preset = preset_for(name)
    if preset is not None and preset.pretrained_cfg is not None:
        arch, tag = timm.models.split_model_name_tag(name)
        return PretrainedCfg(**dict(preset.pretrained_cfg, architecture=arch, tag=tag))
    return timm.models.get_pretrained_cfg(name)


def reference_backbone(name: str) -> str | None:
    """The reference CSVs' `backbone` id of the backbone `name` trains on, or None when no paper uses it."""
    preset = preset_for(name)
    return preset.reference if preset else None


def preset_rows() -> list[dict[str, str]]:
    """The presets as the rows `python -m benchmark backbones` prints."""
    return [
        {
            "name": p.name,
            "family": p.family,
            "title": p.title,
            "weights": p.weights,
            "normalization": p.normalization,
            "pooling": p.pooling,
            "papers": ", ".join(p.papers),
            "reference": p.reference,
        }
        for p in PRESETS
    ]
