"""The demo backbone: a tiny timm ViT that the project pretrains itself on a procedural upstream task.

`peft_bench_demo_vit` (registered in `benchmark/run/backbone.py`) is a tiny timm ViT; `pretrain` trains it from scratch on an upstream task the demo tasks never use: each image shows a
background texture and one object; the network names the texture (4), the object's shape (3) and its
hue (6). That gives it real, semantic features (like ImageNet pretraining) but nothing about counts,
sizes, positions or orientations, which the structured demo tasks must adapt to. The weights are
written as safetensors with a JSON report beside them; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.plugins.environments import LightningEnvironment
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from benchmark.data.arrays import normalize
from benchmark.run.backbone import DEMO_BACKBONE, DEMO_VIT_ARGS, NORMALIZATIONS
from benchmark.run.runner import quiet_lightning
from tasks.synth import finish_image, paint_shape, unit_grid

HEADS = {"texture": 4, "shape": 3, "hue": 6}


def _hue(h: float) -> np.ndarray:
    """A saturated RGB colour for hue `h` in [0, 1)."""
    return np.clip(np.abs((h * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1) * 0.8 + 0.15


def upstream_image(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One upstream image, uint8 [S, S, 3], and its (texture, shape, hue) labels."""
    yy, xx = unit_grid(size)
    texture, shape, hue = int(rng.integers(4)), int(rng.integers(3)), int(rng.integers(6))
    freq, (dy, dx) = rng.uniform(2, 5), rng.uniform(0, 1, size=2)
    if texture == 0:
        field = np.sin(2 * math.pi * freq * (xx + dx)) > 0
    elif texture == 1:
        field = np.sin(2 * math.pi * freq * (yy + dy)) > 0
    elif texture == 2:
        field = (np.floor((xx + dx) * freq) + np.floor((yy + dy) * freq)) % 2 == 0
    else:
        field = rng.uniform(size=(size, size)) > 0.5
    grey = rng.uniform(0.1, 0.45)
    img = np.where(field[..., None], grey + 0.15, grey)[..., :1].repeat(3, axis=2)
    colour = _hue((hue + rng.uniform(0.15, 0.85)) / 6)
    kind = ("disc", "square", "bar")[shape]
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    paint_shape(img, cy, cx, rng.uniform(0.15, 0.3), colour, kind, rng.uniform(0, 2 * math.pi))
    return finish_image(img, rng, 0.04), (texture, shape, hue)


def upstream_data(n: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """`n` upstream images as uint8 [n, 3, S, S] and labels [n, 3]."""
    rng = np.random.default_rng(seed)
    images, labels = zip(*(upstream_image(rng, size) for _ in range(n)), strict=True)
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()), torch.tensor(labels)


class UpstreamModule(pl.LightningModule):
    """The backbone plus one linear head per upstream attribute, trained with the sum of their losses."""

    def __init__(self, backbone: VisionTransformer, lr: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.ModuleList(torch.nn.Linear(backbone.num_features, n) for n in HEADS.values())
        self.lr = lr
        mean, std = NORMALIZATIONS["imagenet"]
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.val_correct = torch.zeros(len(HEADS))
        self.val_seen = 0

    def logits(self, images: Tensor) -> list[Tensor]:
        features = self.backbone(normalize(images, self.mean, self.std))
        return [head(features) for head in self.heads]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = sum(F.cross_entropy(logit, y[:, i]) for i, logit in enumerate(self.logits(x)))
        self.log("upstream/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        for i, logit in enumerate(self.logits(x)):
            self.val_correct[i] += (logit.argmax(-1) == y[:, i]).sum().item()
        self.val_seen += len(y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def pretrain(out: Path, *, images: int = 20_000, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3,
             seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Pretrain the demo backbone on the upstream task and write `out` (safetensors) and `out.json` (report)."""
    started = time.perf_counter()
    quiet_lightning()  # a first `make demo` shows the progress bar and the one-line report, not Lightning's banners
    pl.seed_everything(seed, workers=True, verbose=False)
    x, y = upstream_data(images, seed)
    val_x, val_y = upstream_data(2_000, seed + 1)
    generate_s = time.perf_counter() - started
    backbone = _create_vision_transformer(DEMO_BACKBONE, pretrained=False, num_classes=0, **DEMO_VIT_ARGS)
    module = UpstreamModule(backbone, lr)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                         check_val_every_n_epoch=epochs, plugins=[LightningEnvironment()])  # fmt: skip
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=512)
    trainer.fit(module, train, val)
    accuracy = {name: 100.0 * float(c) / module.val_seen for name, c in zip(HEADS, module.val_correct, strict=True)}
    chance = {name: 100.0 / n for name, n in HEADS.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in module.backbone.state_dict().items()}
    save_file(state, str(tmp), metadata={"architecture": DEMO_BACKBONE, "upstream": "procedural texture/shape/hue"})
    tmp.replace(out)
    report = {"backbone": DEMO_BACKBONE, "images": images, "epochs": epochs, "seed": seed,
              "upstream_val_accuracy": accuracy, "chance": chance, "generate_s": round(generate_s, 1),
              "total_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report
