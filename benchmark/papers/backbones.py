"""The backbones of the reported rows, and which of them a run of ours is compared with.

Every reference row names its backbone (the `backbone` column of `results/reference/*.csv`, the ids of
`benchmark.run.presets`) and the checkpoint behind it (`backbone_weights`). Rows of different backbones are never
compared with each other, nor with a run on another backbone: a run's backbone comes from its recorded config
(`config.backbone`, mapped by `presets.reference_backbone`).

A run on a ViT the papers do not use (the demo's tiny ViT, `test_vit`, another size or a random init) stands in for
the default backbone, as it always has: it is compared with the ViT-B/16 IN-21k rows, every line marked as a
backbone mismatch. A Swin other than Swin-B IN-22k (or any other family) has no rows: it is compared with nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.run.presets import reference_backbone

DEFAULT_REFERENCE_BACKBONE = "vit_b16_in21k"
# Backbone ids of the reference files: what tables print, and the checkpoints (`backbone_weights`) of each.
REFERENCE_BACKBONES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vit_b16_in21k": ("ViT-B/16 (IN-21k)", ("orig_in21k", "augreg_in21k")),
    "swin_b_in22k": ("Swin-B (IN-22k)", ("ms_in22k",)),
    "vit_b16_mae": ("ViT-B/16 (MAE)", ("mae",)),
    "vit_b16_mocov3": ("ViT-B/16 (MoCo v3)", ("mocov3",)),
}
# Backbone weights of the reported rows, as the suite names the backbone that loads them.
BACKBONE_WEIGHTS: dict[str, str] = {
    "orig_in21k": "vit_base_patch16_224.orig_in21k",
    "augreg_in21k": "vit_base_patch16_224.augreg_in21k",
    "ms_in22k": "swin_base_patch4_window7_224.ms_in22k",
    "mae": "vit_base_patch16_224.mae",
    "mocov3": "vit_base_patch16_224.mocov3",
}


def backbone_identity(config: dict[str, Any]) -> tuple[str | None, str]:
    """Which reference checkpoint a run used (a `BACKBONE_WEIGHTS` label, or None) and how to name it.

    A run matches a reference checkpoint when it ran that backbone at 224 px with pretrained weights tagged as
    that checkpoint (a local `--weights` file is taken to be what the backbone name says), or Google's original
    `ViT-B_16.npz` on a ViT-B/16.
    """
    name = config.get("backbone", "?")
    weights = config.get("weights")
    size = config.get("image_size")
    text = (
        name + (f" ({Path(weights).name})" if weights else "") + (f" at {size} px" if size not in (None, 224) else "")
    )
    if not config.get("pretrained", True):
        return None, f"{name} (random init)"
    if size not in (None, 224):
        return None, text
    if name.partition(".")[0] == "vit_base_patch16_224" and weights and Path(weights).name == "ViT-B_16.npz":
        return "orig_in21k", text
    label = next((label for label, timm in BACKBONE_WEIGHTS.items() if timm == name), None)
    if label is None:  # a preset named otherwise whose backbone has a single checkpoint
        labels = REFERENCE_BACKBONES.get(reference_backbone(name) or "", ("", ()))[1]
        label = labels[0] if len(labels) == 1 else None
    return label, text


def run_backbone(config: dict[str, Any]) -> str | None:
    """The reference backbone id whose rows a run is compared with (None: no reference row uses its backbone)."""
    name = str(config.get("backbone") or "")
    found = reference_backbone(name)
    if found in REFERENCE_BACKBONES:
        return found
    weights, _ = backbone_identity(config)
    for backbone, (_, labels) in REFERENCE_BACKBONES.items():
        if weights in labels:
            return backbone
    return None if "swin" in name.lower() else DEFAULT_REFERENCE_BACKBONE


def backbone_title(backbone: str | None) -> str:
    """How reports name a reference backbone id."""
    return REFERENCE_BACKBONES[backbone][0] if backbone in REFERENCE_BACKBONES else "no reference backbone"
