"""The frozen backbone: a timm `VisionTransformer` or `SwinTransformer`, pretrained from the Hub, a local file, or
random."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from timm.models import generate_default_cfgs, register_model, swin_transformer, vision_transformer
from timm.models.swin_transformer import SwinTransformer, _create_swin_transformer
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer, checkpoint_filter_fn

from benchmark.core.errors import UserError
from benchmark.run.checkpoints import convert_checkpoint
from benchmark.run.presets import preset_for, pretrained_cfg
from methods import Backbone

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
# A tiny Swin for tests and smoke runs, registered the same way (`--backbone peft_bench_tiny_swin --no-pretrained`):
# 32 px input, 2 px patches (a 16×16 grid), windows of 4 (the last stage's 2×2 grid clips it to 2, unshifted, as
# timm does whenever a window would exceed the grid), widths 16·2^s, depths 2 per stage.
TINY_SWIN = "peft_bench_tiny_swin"
TINY_SWIN_ARGS = dict(
    img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)
)
default_cfgs = generate_default_cfgs({
    f"{DEMO_BACKBONE}.procedural": {"input_size": (3, 32, 32), "num_classes": 0, "interpolation": "bicubic"},
    f"{TINY_SWIN}.random": {"input_size": (3, 32, 32), "num_classes": 0, "interpolation": "bicubic"},
})  # fmt: skip


@register_model
def peft_bench_demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo's tiny ViT: 32 px input, 8 px patches (a 4×4 grid), width 64, 4 blocks, 4 heads."""
    return _create_vision_transformer(DEMO_BACKBONE, pretrained=pretrained, **dict(DEMO_VIT_ARGS, **kwargs))


@register_model
def peft_bench_tiny_swin(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """A tiny Swin for tests: 32 px input, 2 px patches, windows of 4, widths 16, 32, 64, 128, depths 2 each."""
    return _create_swin_transformer(TINY_SWIN, pretrained=pretrained, **dict(TINY_SWIN_ARGS, **kwargs))


def meta_backbone(name: str, image_size: int | None = None, **kwargs: Any) -> Backbone:
    """`create_backbone`'s structure on the meta device (shapes, no weights), built once per arguments and shared:
    for checks, which only read it. Never attach a method to it (build your own with `device="meta"`)."""
    return _meta_backbone(name, image_size, tuple(sorted(kwargs.items())))


@lru_cache(maxsize=64)
def _meta_backbone(name: str, image_size: int | None, kwargs: tuple[tuple[str, Any], ...]) -> Backbone:
    return create_backbone(name, pretrained=False, image_size=image_size, device="meta", **dict(kwargs))


def _check_name(name: str) -> None:
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UserError(
            f"unknown backbone {name!r}; pick a timm ViT or Swin, e.g. {DEFAULT_BACKBONE}, test_vit or "
            "swin_base_patch4_window7_224.ms_in22k (`python -m benchmark backbones` lists the papers' ones)"
        )
    known = timm.models.get_arch_pretrained_cfgs(arch)
    if tag and preset_for(name) is None and name not in known:
        raise UserError(f"{arch} has no pretrained tag {tag!r}; pick one of timm's ({', '.join(known)}) or no tag")


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    init_seed: int = 0,
    **kwargs: Any,
) -> Backbone:
    """Create a headless timm ViT or Swin (`num_classes=0`) with all stochastic rates 0 unless `kwargs` say otherwise.

    Args:
        name: timm model name, with an optional pretrained tag (`arch.tag`).
        pretrained: load the tag's weights from the Hugging Face Hub.
        weights: a local checkpoint instead (`.safetensors`, `.pth`/`.bin`, or Google's `.npz`).
        image_size: input size; position embeddings of pretrained weights are resampled to it.
        device: where to build the model; `meta` builds the structure without allocating weights.
        init_seed: seed of the random initialisation (what remains random without pretrained weights),
            so a random backbone is the same in every process; the global RNG is left as it was.
        kwargs: forwarded to `timm.create_model` (e.g. `drop_path_rate`); they win over a preset's own
            arguments (`benchmark.run.presets`: MAE's average pooling through a fresh `fc_norm`).
    """
    _check_name(name)
    preset = preset_for(name)
    args: dict[str, Any] = dict(
        num_classes=0, drop_rate=0.0, attn_drop_rate=0.0, proj_drop_rate=0.0, drop_path_rate=0.0
    )
    if preset is not None:
        args.update(preset.create_kwargs)
        if preset.pretrained_cfg is not None:  # a tag timm does not know
            args["pretrained_cfg"] = pretrained_cfg(name)
    args.update(kwargs)
    if image_size is not None:
        args["img_size"] = image_size
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist; pass an existing checkpoint to --weights")
        source = f"weights file {path}"
    elif pretrained:
        path = hub_weights(name)
        source = f"pretrained weights of {name} ({path})"
    else:
        path = None
    try:
        with (
            torch.random.fork_rng(devices=[]),
            torch.device(device) if device is not None else contextlib.nullcontext(),
        ):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=False, **args)
    except TypeError as e:  # another architecture rejects the arguments above
        raise UserError(
            f"backbone {name!r} is not a timm VisionTransformer or SwinTransformer ({e}); pick e.g. {DEFAULT_BACKBONE}"
        ) from None
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not build backbone {name!r} ({_first_line(e)})") from None
    if not isinstance(model, VisionTransformer | SwinTransformer):
        raise UserError(
            f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer or SwinTransformer"
        )
    if path is not None:
        load_weights(model, path, name=name, source=source)
    return model


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: Backbone, path: str | Path, *, name: str, source: str | None = None) -> None:
    """Load a checkpoint into `model`, refusing (one-line `UserError`) any file that does not fit it exactly.

    timm reads the file (`.safetensors`, a torch pickle loaded weights-only, or Google's `.npz`), unwraps
    `state_dict`/`model` entries and strips the `module.`/`_orig_mod.` prefixes that DDP and
    `torch.compile` add; a preset's official layout (MAE, MoCo v3) is converted by `benchmark.run.checkpoints`,
    refused in one line when its keys are another layout; then timm converts it to the model's layout
    (`checkpoint_filter_fn`: other checkpoint formats, position embeddings and patch embeddings resampled to
    this image and patch size). What is left must match the model key for key and shape for shape, except the classifier head (`head.weight`,
    `head.bias`), which the headless backbone drops. timm itself only warns about missing or unexpected
    keys when the head is removed, which would let another model's checkpoint, or half of one, train on
    random weights without a word. Other prefixes (`model.`, `backbone.`) are not stripped, since they may
    name one part of a larger model: the message says to save the backbone's own state_dict.
    """
    path = Path(path)
    source = source or f"weights file {path}"
    if path.suffix == ".npz" and isinstance(model, VisionTransformer):
        _load_npz(model, path, name=name, source=source)
        return
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as e:  # safetensors, torch and pickle raise many types for a damaged or foreign file
        raise UserError(
            f"cannot read {source} ({type(e).__name__}: {_first_line(e)}); pass a complete .safetensors, "
            ".pth/.bin or .npz checkpoint"
        ) from None
    conversion = getattr(preset_for(name), "checkpoint", None)
    if conversion is not None:
        try:
            state = convert_checkpoint(conversion, state, model)
        except ValueError as e:
            raise UserError(f"{source} for backbone {name}: {e}") from None
    try:
        state = _checkpoint_filter(name, model)(state, model)
    except Exception as e:  # the conversion indexes tensors by the model's shapes and fails on foreign ones
        raise UserError(f"{source} does not fit backbone {name} ({type(e).__name__}: {_first_line(e)})") from None
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    heads = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k not in heads or k in expected}
    missing = [k for k in expected if k not in state and k not in heads]
    unexpected = [k for k, v in state.items() if k not in expected or not isinstance(v, torch.Tensor)]
    reshaped = [
        f"{k} {list(v.shape)} vs {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the backbone's {len(expected)} tensors are missing ({_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} are not in the backbone ({_few(unexpected)})")
        if reshaped:
            problems.append(f"{len(reshaped)} have other shapes ({_few(reshaped, 2)})")
        raise UserError(
            f"{source} does not fit backbone {name}: {'; '.join(problems)}{_prefix_hint(unexpected, missing)}; "
            "pass the checkpoint of this backbone, or the --backbone it was saved from"
        )
    model.load_state_dict(state, strict=False)


def _checkpoint_filter(name: str, model: Backbone) -> Callable[..., dict[str, torch.Tensor]]:
    """The conversion timm's factory of `model`'s family applies to the checkpoints of `name` (for Swin: the
    official layout, which merges patches at the end of a stage, renamed to timm's)."""
    if isinstance(model, SwinTransformer):
        return swin_transformer.checkpoint_filter_fn
    if "flexi" in name:  # FlexiViT: bilinear resampling without antialiasing
        return partial(checkpoint_filter_fn, interpolation="bilinear", antialias=False)
    if "radio" in name:  # RADIO: bilinear without antialiasing, corners aligned for some variants
        aligned = any(v in name for v in getattr(vision_transformer, "_RADIO_ALIGN_CORNERS", ()))
        return partial(checkpoint_filter_fn, interpolation="bilinear", antialias=False, align_corners=aligned)
    return checkpoint_filter_fn


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """A note when the checkpoint's keys are the backbone's under one wrapper prefix (`model.blocks.0...`)."""
    prefixes = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(prefixes) != 1 or not missing:
        return ""
    prefix = prefixes.pop()
    stripped = {k.split(".", 1)[1] for k in unexpected if "." in k}
    if len(stripped & set(missing)) < len(missing) / 2:
        return ""
    return f" (its keys carry the prefix '{prefix}.': save the backbone's own state_dict, without the wrapper)"


def _load_npz(model: VisionTransformer, path: Path, *, name: str, source: str) -> None:
    """Google's `.npz` checkpoints, loaded by timm's `load_pretrained`, after checking their depth.

    timm reads each tensor it needs by name, so a missing one or another shape already fails; but blocks
    beyond the model's depth would be left unread without a word, so the block count is checked first.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            stacked = [f for f in files if f.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            depth = int(npz[stacked[0]].shape[0]) if stacked else None
    except Exception as e:  # numpy and zipfile raise many types for a damaged archive
        raise UserError(
            f"cannot read {source} ({type(e).__name__}: {_first_line(e)}); pass a complete .npz checkpoint"
        ) from None
    if depth is None:
        indices = {int(m.group(1)) for f in files if (m := re.search(r"Transformer/encoderblock_(\d+)/", f))}
        depth = max(indices) + 1 if indices else None
    if depth is not None and depth != len(model.blocks):
        raise UserError(
            f"{source} does not fit backbone {name}: it holds {depth} transformer blocks, the backbone has "
            f"{len(model.blocks)}; pass the checkpoint of this backbone, or the --backbone it was saved from"
        )
    try:
        model.load_pretrained(str(path))
    except KeyError as e:
        raise UserError(
            f"{source} does not fit backbone {name}: it lacks {e}; pass the checkpoint of this backbone"
        ) from None
    except Exception as e:  # shape mismatches (RuntimeError), unknown layouts (ValueError), damaged members
        raise UserError(f"{source} does not fit backbone {name} ({type(e).__name__}: {_first_line(e)})") from None


def hub_weights(name: str) -> Path:
    """Local path of a model's pretrained weights, from the Hugging Face cache or downloaded into it.

    huggingface_hub retries unreachable hosts for tens of seconds with a log line per try; a short
    connection check first turns an offline machine into one clear error instead.
    """
    import huggingface_hub
    from huggingface_hub import constants

    cfg = pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        preset = preset_for(name)
        wanted = preset.weights if preset is not None and preset.weights.startswith("--weights") else "--weights FILE"
        raise UserError(f"{name} has no weights on the Hugging Face Hub; pass {wanted}, or --no-pretrained")
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


def swin_windows(model: SwinTransformer) -> list[int]:
    """The window side of each Swin stage as built for its default size (timm clips a window to a smaller grid)."""
    ref = getattr(model, "_ref_window_sizes", None)  # timm keeps the constructor's windows here
    if ref is not None:
        return [int(w[0] if isinstance(w, tuple | list) else w) for w in ref]
    return [int(stage.blocks[0].window_size[0]) for stage in model.layers]


def swin_size_fits(side: int, patch: int, windows: list[int]) -> bool:
    """Whether a square image of `side` px runs on a Swin without padding: whole patches, an even grid before each
    patch merging, and each stage's grid a multiple of its window (or no larger, as timm then shrinks the window)."""
    if side < patch or side % patch:
        return False
    grid = side // patch
    for stage, window in enumerate(windows):
        if stage:
            if grid % 2:
                return False
            grid //= 2
        if grid > window and grid % window:
            return False
    return True


def default_image_size(name: str) -> int:
    """The input size a backbone name implies (its pretrained cfg), without building it."""
    _check_name(name)
    cfg = pretrained_cfg(name)
    if cfg is not None and cfg.input_size is not None:
        return int(cfg.input_size[-1])
    return 224
