"""The official checkpoints of the self-supervised presets, converted to timm's `VisionTransformer` layout.

`load_weights` reads a file with timm (which unwraps `state_dict`/`model` entries and strips the `module.` prefix
of DDP), then, for a preset with a `checkpoint` conversion, applies it here before timm's own filter and the
key-for-key check. A conversion refuses (`ValueError`, one line naming the layout it expected) any file whose keys
are not the layout it converts.

- **MAE** (`mae_pretrain_vit_base.pth`, keys under `model`, or the Hub's timm copy): the encoder as saved by
  MAE's pre-training, with its final `norm`. The preset pools the average of the patch tokens through a fresh
  `fc_norm` (MAE's fine-tuning model, as VPT builds it): the checkpoint's `norm.*` is dropped (VPT deletes it
  before loading) and `fc_norm` starts at the identity (weight 1, bias 0), which it stays on a frozen encoder.
- **MoCo v3** (`linear-vit-b-300ep.pth.tar`, the official linear-probing checkpoint): a DDP-wrapped ViT whose
  keys already follow timm's names, under `state_dict` with the `module.` prefix; its `head.*` (the linear
  classifier) is dropped. The pre-training checkpoint (`vit-b-300ep.pth.tar`) is read too: only
  `module.base_encoder.*` is kept (the `momentum_encoder.*` and `predictor.*` entries are dropped), and its
  `head.*` (the projection MLP) with it. MoCo v3's position embedding is a fixed 2-D sin-cos table stored in the
  checkpoint as `pos_embed`, with a zero slot for the CLS token; timm's ViT adds `pos_embed` to CLS + patches,
  so carrying the table as is gives the same sums (CLS + 0, patch + its sin-cos row). At another image size timm
  resamples the table as it does any position embedding (bicubic), an approximation of MoCo v3's table at that
  grid. Features are the CLS token after the final norm, timm's `token` pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONVERSIONS = ("mae", "mocov3")

MOCOV3_LAYOUT = (
    "the official MoCo v3 layout: a `state_dict` of ViT keys with the `module.` prefix (module.cls_token, "
    "module.pos_embed, module.patch_embed.proj.weight, module.blocks.0.attn.qkv.weight, ..., module.norm.weight, "
    "module.head.weight) as in linear-vit-b-300ep.pth.tar, or under `module.base_encoder.` as in a pre-training "
    "checkpoint"
)
MAE_LAYOUT = (
    "MAE's pre-trained encoder layout: keys cls_token, pos_embed, patch_embed.proj.weight, blocks.0.attn.qkv.weight, "
    "..., norm.weight (under `model` in mae_pretrain_vit_base.pth)"
)


def convert_checkpoint(kind: str, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """`state` converted by the preset's conversion `kind` (`mae` or `mocov3`) to `model`'s keys."""
    if kind == "mae":
        return mae_state(state, model)
    if kind == "mocov3":
        return mocov3_state(state, model)
    raise ValueError(f"unknown checkpoint conversion {kind!r}; pick one of {', '.join(CONVERSIONS)}")


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_keys(state: dict[str, Tensor], expected: set[str], layout: str, what: str) -> None:
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"{len(missing)} keys missing ({_few(missing)})")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise ValueError(f"not a {what} checkpoint: {' and '.join(found)}; expected {layout}")


def mae_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """MAE's encoder for the average-pooling preset: the checkpoint's final `norm.*` dropped, `fc_norm` the identity.

    A checkpoint that already holds `fc_norm.*` (one saved from this backbone) is taken as it is.
    """
    state = _strip(dict(state), "module.")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    fc_norm = getattr(model, "fc_norm", None)
    if not isinstance(fc_norm, nn.LayerNorm) or "fc_norm.weight" in state:
        return state
    expected = {k for k in model.state_dict() if not k.startswith("fc_norm.")} | {"norm.weight", "norm.bias"}
    _check_keys(state, expected, MAE_LAYOUT, "MAE")
    state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    state["fc_norm.weight"] = torch.ones_like(fc_norm.weight, device="cpu")
    state["fc_norm.bias"] = torch.zeros_like(fc_norm.bias, device="cpu")
    return state


def mocov3_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The official MoCo v3 ViT checkpoint (linear-probing or pre-training) in timm's keys, its head dropped."""
    state = _strip(dict(state), "module.")
    if any(k.startswith("base_encoder.") for k in state):
        state = {k[len("base_encoder.") :]: v for k, v in state.items() if k.startswith("base_encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    _check_keys(state, set(model.state_dict()), MOCOV3_LAYOUT, "MoCo v3")
    pos, prefix = state["pos_embed"], int(getattr(model, "num_prefix_tokens", 1))
    if pos.dim() != 3 or pos.shape[1] <= prefix or pos[:, :prefix].abs().max() != 0:
        raise ValueError(
            f"not a MoCo v3 checkpoint: its pos_embed {list(pos.shape)} has no zero CLS slot in front of the fixed "
            f"sin-cos table; expected {MOCOV3_LAYOUT}"
        )
    return state
