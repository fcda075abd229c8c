"""The frozen backbone: a timm `VisionTransformer`, pretrained from the Hub, a local file, or random."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from benchmark.errors import UserError

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"

# Per the suite's preprocessing spec: ImageNet statistics by default, never derived from timm's cfg.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


# The demo's backbone, a timm ViT variant registered the way timm registers its own, so `--backbone
# peft_bench_demo_vit` works everywhere. `python -m benchmark pretrain-demo` trains its weights.
DEMO_BACKBONE = "peft_bench_demo_vit"
DEMO_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
default_cfgs = generate_default_cfgs({
    f"{DEMO_BACKBONE}.procedural": {"input_size": (3, 32, 32), "num_classes": 0, "interpolation": "bicubic"},
})  # fmt: skip


@register_model
def peft_bench_demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo's tiny ViT: 32 px input, 8 px patches (a 4×4 grid), width 64, 4 blocks, 4 heads."""
    return _create_vision_transformer(DEMO_BACKBONE, pretrained=pretrained, **dict(DEMO_VIT_ARGS, **kwargs))


def _check_name(name: str) -> None:
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        raise UserError(f"unknown backbone {name!r}; pick a timm ViT, e.g. {DEFAULT_BACKBONE} or test_vit")


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    init_seed: int = 0,
    **kwargs: Any,
) -> VisionTransformer:
    """Create a headless timm ViT (`num_classes=0`) with all stochastic rates 0 unless `kwargs` say otherwise.

    Args:
        name: timm model name, with an optional pretrained tag (`arch.tag`).
        pretrained: load the tag's weights from the Hugging Face Hub.
        weights: a local checkpoint instead (`.safetensors`, `.pth`/`.bin`, or Google's `.npz`).
        image_size: input size; position embeddings of pretrained weights are resampled to it.
        device: where to build the model; `meta` builds the structure without allocating weights.
        init_seed: seed of the random initialisation (what remains random without pretrained weights),
            so a random backbone is the same in every process; the global RNG is left as it was.
        kwargs: forwarded to `timm.create_model` (e.g. `drop_path_rate`).
    """
    _check_name(name)
    args: dict[str, Any] = dict(
        num_classes=0, drop_rate=0.0, attn_drop_rate=0.0, proj_drop_rate=0.0, drop_path_rate=0.0
    )
    args.update(kwargs)
    if image_size is not None:
        args["img_size"] = image_size
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist; pass an existing checkpoint to --weights")
        overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
        args.update(pretrained=True, pretrained_cfg_overlay=overlay)
    elif pretrained:
        args.update(pretrained=True, pretrained_cfg_overlay={"file": str(hub_weights(name))})
    else:
        args["pretrained"] = False
    try:
        with (
            torch.random.fork_rng(devices=[]),
            torch.device(device) if device is not None else contextlib.nullcontext(),
        ):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, **args)
    except TypeError as e:  # a non-ViT architecture rejects the ViT arguments above
        raise UserError(
            f"backbone {name!r} is not a timm VisionTransformer ({e}); pick e.g. {DEFAULT_BACKBONE}"
        ) from None
    except (OSError, RuntimeError, ValueError) as e:
        what = (
            f"weights {weights}" if weights is not None else f"pretrained weights of {name} from the Hugging Face Hub"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load {what} ({reason[:200]}); pass --weights FILE for a local checkpoint "
            "or --no-pretrained for random weights"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise UserError(f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def hub_weights(name: str) -> Path:
    """Local path of a model's pretrained weights, from the Hugging Face cache or downloaded into it.

    huggingface_hub retries unreachable hosts for tens of seconds with a log line per try; a short
    connection check first turns an offline machine into one clear error instead.
    """
    import huggingface_hub
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise UserError(f"{name} has no weights on the Hugging Face Hub; pass --weights FILE or --no-pretrained")
    files = ("model.safetensors", "pytorch_model.bin")
    for filename in files:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    advice = f"download {repo} elsewhere and pass --weights FILE, or use --no-pretrained for random weights"
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or offline_env:
        raise UserError(
            f"weights of {name} ({repo}) are not in the Hugging Face cache and HF_HUB_OFFLINE is set; {advice}"
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub ({host}: {e}) to download {repo}; {advice}") from None
    errors = []
    for filename in files:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        except Exception as e:  # the Hub raises many types (HTTP, not found, gated); report the last one
            errors.append(f"{filename}: {e}")
    raise UserError(f"could not download weights of {name} from {repo} ({errors[-1][:200]}); {advice}")


def default_image_size(name: str) -> int:
    """The input size a backbone name implies (its pretrained cfg), without building it."""
    _check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.input_size is not None:
        return int(cfg.input_size[-1])
    return 224
