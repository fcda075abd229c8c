"""How a method is trained: the `Recipe` (optimiser, schedule, batch, epochs, grids), validated when made."""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant", "timm-cosine")


@dataclass
class Recipe:
    """How a method is trained: optimiser, learning-rate schedule (stepped per epoch), batch and epochs.

    Attributes:
        optimizer: `sgd` (with `momentum`) or `adamw`.
        lr: peak learning rate, used as given (no batch-size scaling is applied on top).
        weight_decay: applied to every trainable tensor except those the model lists in
            `no_weight_decay_parameters()`.
        momentum: SGD momentum.
        batch_size: images per optimisation step.
        epochs: training epochs.
        warmup_epochs: linear warm-up from `warmup_start_lr` (epoch 0 runs at `warmup_start_lr`).
        warmup_start_lr: learning rate at epoch 0 when warming up.
        min_lr: the cosine schedule's floor.
        schedule: `cosine` (after warm-up), `constant`, or `timm-cosine`: timm's `CosineLRScheduler` stepped
            once per epoch after the epoch, as the official Convpass trainer does (epoch 0 at
            `warmup_start_lr`, epoch e ≥ 1 at the scheduler's value for e − 1, a cosine over all epochs that
            the warm-up does not shift).
        drop_last: drop the last incomplete batch of each training epoch.
        lr_grid: learning rates searched by the `grid` protocol.
        wd_grid: weight decays searched by the `grid` protocol.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    schedule: str = "cosine"
    drop_last: bool = False
    lr_grid: tuple[float, ...] = ()
    wd_grid: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.lr_grid = tuple(float(x) for x in self.lr_grid)
        self.wd_grid = tuple(float(x) for x in self.wd_grid)
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}"),
            (0 <= self.weight_decay < math.inf, f"weight decay must be non-negative, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (0 <= self.warmup_start_lr < math.inf, f"warm-up start lr must be >= 0, got {self.warmup_start_lr}"),
            (0 <= self.min_lr < math.inf, f"minimum lr must be >= 0, got {self.min_lr}"),
            (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be non-negative, got {self.warmup_epochs}"),
            (all(0 < x < math.inf for x in self.lr_grid), f"every grid lr must be positive, got {self.lr_grid}"),
            (
                all(0 <= x < math.inf for x in self.wd_grid),
                f"every grid weight decay must be >= 0, got {self.wd_grid}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of `epoch` (0-based): linear warm-up, then cosine from `lr` to `min_lr`."""
        if self.schedule == "timm-cosine":
            if epoch == 0:
                return self.warmup_start_lr
            t = epoch - 1
            if t < self.warmup_epochs:
                return self.warmup_start_lr + t * (self.lr - self.warmup_start_lr) / self.warmup_epochs
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t / self.epochs))
        warmup = min(self.warmup_epochs, self.epochs - 1)
        if epoch < warmup:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * epoch / warmup
        if self.schedule == "constant":
            return self.lr
        progress = (epoch - warmup) / max(1, self.epochs - warmup)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
