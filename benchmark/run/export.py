"""`export --merge`: a run's adapted model as a plain timm ViT checkpoint (safetensors), method folded in.

A run saved with `--save-tunable` leaves its tunable state (plus head) beside its result JSON
(`<protocol>-s<seed>.safetensors`). `export --merge RESULT.json` rebuilds that run's model from the result
(method config, backbone, weights, image size, task), loads the state, asks the method for its merged backbone
(`PeftModel.merged_backbone`: the re-parameterisable methods fold their modules into the frozen weights) and
writes the backbone plus the head as one timm state dict. The merged model IS a plain timm `VisionTransformer`,
so its forward costs exactly the frozen backbone's. Before writing, the merged model's logits are compared
with the adapted model's on a random batch (fp32, evaluation mode) and the largest difference is reported.
Export never writes over a file it reads: an output that is the result, its tunable state or the backbone's
weights file (by resolved path, through symbolic and hard links) or a directory is refused before any work.

Load it with `timm.create_model(name, num_classes=C, pretrained=True, pretrained_cfg_overlay=dict(file=FILE,
num_classes=C))`, or `load_state_dict(safetensors.torch.load_file(FILE))` on `timm.create_model(name,
num_classes=C)` (add `img_size=` when the run used another input size). The file's metadata names them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import save
from timm.models.vision_transformer import VisionTransformer

from benchmark.core.errors import UserError
from benchmark.run.presets import preset_for
from benchmark.run.results import read_result
from methods import NotMergeableError
from tasks.atomic import atomic_write_bytes

# The largest logit difference (fp32) export accepts between the merged and the adapted model.
TOLERANCE = 1e-4
CHECK_IMAGES = 4


def merged_model(model: Any, num_classes: int, method: str) -> VisionTransformer:
    """The method's merged backbone with a timm head carrying `model`'s head weights (a plain timm ViT)."""
    try:
        merged = model.merged_backbone()
    except NotMergeableError as e:
        raise UserError(f"{method} cannot be merged: {e}; export needs a re-parameterisable method") from None
    merged.reset_classifier(num_classes)
    getattr(merged.head, "fc", merged.head).load_state_dict(model.head.state_dict())  # Swin's head holds `fc`
    return merged.requires_grad_(False)


def rebuild(record: dict[str, Any], state_path: Path) -> tuple[Any, Any]:
    """The run's model (tunable state loaded) and its task, from its result record: the config it recorded (its
    resolved one) on the backbone that config and the recorded settings give (`benchmark.run.resolve`)."""
    from benchmark.run.resolve import build_backbone, config_from_record, settings_from_record
    from tasks import UnknownTaskError, get_task

    config = config_from_record(record)
    try:
        task = get_task(record["task"])
    except UnknownTaskError as e:
        raise UserError(str(e)) from None
    if record.get("pruning"):
        raise UserError(f"{config.name} prunes, so it adds tokens the backbone cannot absorb; it cannot be merged")
    backbone = build_backbone(config, settings_from_record(record))
    model = config.build(backbone, task.num_classes)
    try:
        model.load_tunable(state_path)
    except SafetensorError as e:
        raise UserError(f"{state_path} is not a readable tunable state ({e}); it is damaged: train the run again "
                        "with --save-tunable") from None  # fmt: skip
    except ValueError as e:
        raise UserError(f"{state_path} does not fit the run's model ({e})") from None
    return model.eval(), task


def tunable_state_path(result: Path, record: dict[str, Any]) -> Path:
    """The tunable state saved beside `result`: the file its record names, which must lie in the run's folder."""
    name = record.get("tunable_state") or f"{result.stem}.safetensors"
    if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or "\0" in name:
        raise UserError(f"{result} names its tunable state {name!r}, which is not a file in the run's folder; export "
                        f"reads only a state saved beside its result (e.g. {result.stem}.safetensors)")  # fmt: skip
    return result.with_name(name)


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file: the same inode where both exist (symbolic or hard links), else the same
    resolved path."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse, before any work, an output path that is a directory or one of `inputs` (what it is -> path)."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; pass a file name (e.g. {out / 'merged.safetensors'})")
    for what, path in inputs.items():
        if _same_file(out, path):
            raise UserError(f"--out {out} is {what} ({path}), which export reads and never writes over; pass "
                            "another file")  # fmt: skip


def export_merged(result: Path, out: Path) -> dict[str, Any]:
    """Write the merged checkpoint of the run whose result is `result` to `out`; return what was written."""
    record = read_result(result)  # validated against the result schema
    if record is None:
        raise UserError(f"{result} does not exist; pass a run's result JSON")
    if record.get("status") != "ok":
        raise UserError(f"{result} is a failed run ({record.get('error')}); export a successful one")
    state_path = tunable_state_path(result, record)
    if not state_path.is_file():
        raise UserError(f"{result} has no saved tunable state ({state_path.name}); run it again with --save-tunable "
                        "(delete the result first, or pass --out to `run`)")  # fmt: skip
    from benchmark.run.resolve import settings_from_record

    inputs = {"the run's result": result, "the run's tunable state": state_path}
    weights = settings_from_record(record).weights
    if weights:
        inputs["the backbone's weights file"] = Path(weights).expanduser()
    check_output(out, inputs)
    model, task = rebuild(record, state_path)
    merged = merged_model(model, task.num_classes, record["method"]).eval()
    size = model.backbone.patch_embed.img_size
    x = torch.randn(CHECK_IMAGES, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(x) - model(x)).abs().max().item()
    if not diff <= TOLERANCE:
        raise UserError(f"the merged model's logits differ from the adapted model's by {diff:.2e} (> {TOLERANCE:g}); "
                        "nothing written")  # fmt: skip
    name = (record.get("config") or {}).get("backbone", "vit_base_patch16_224")
    metadata = {
        "format": "pt",
        "architecture": name,
        "num_classes": str(task.num_classes),
        "image_size": str(size[0]),
        "method": record["method"],
        "task": task.id,
        "result": str(result),
        "max_logit_diff": f"{diff:.3e}",
    }
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    atomic_write_bytes(out, save(state, metadata=metadata))
    head = sum(p.numel() for p in merged.head.parameters())
    total = sum(p.numel() for p in merged.parameters())
    default_size = (getattr(merged, "pretrained_cfg", None) or {}).get("input_size")
    size_arg = "" if not default_size or default_size[-1] == size[0] else f", img_size={size[0]}"
    preset = preset_for(name)
    if preset is not None:  # timm builds a preset from its architecture plus the preset's own arguments
        name = timm.models.split_model_name_tag(name)[0]
        size_arg += "".join(f", {k}={v!r}" for k, v in preset.create_kwargs.items())
    return {
        "method": record["method"],
        "task": task.id,
        "architecture": name,
        "num_classes": task.num_classes,
        "parameters": total,
        "backbone": total - head,
        "head": head,
        "max_logit_diff": diff,
        "size_arg": size_arg,
    }
