"""One LightningModule for every method: cross-entropy training of a `PeftModel`, top-1 evaluation.

Batches arrive normalised (the DataModule normalises uint8 images on the device) or as cached features.

Logged per epoch through `self.log` (to the Trainer's logger, if any: `benchmark.run.loggers`): `train/loss` (the
epoch's mean, also on the progress bar) and `<eval split>/acc`; with a logger also `train/loss_step` (at the
Trainer's step interval) and `<eval split>/loss`, which cost nothing without one.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from methods import PeftModel, Recipe


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class ClassificationModule(pl.LightningModule):
    """Trains the tunable parameters and head of `model` with `recipe`; evaluates top-1 accuracy.

    Args:
        model: the adapted model (built by a method config).
        num_classes: number of classes of the task.
        recipe: optimiser, schedule (stepped per epoch) and weight decay.
        inputs: `images` (uint8 batches through the whole model) or `features` (cached pooled
            features through the head only, for methods whose features are frozen).
        eval_split: name of the evaluated split (the suite's validation split when tuning, e.g. `val200`, or `test`),
            used for logging.
    """

    def __init__(
        self,
        model: PeftModel,
        *,
        num_classes: int,
        recipe: Recipe,
        inputs: str = "images",
        eval_split: str = "test",
    ) -> None:
        super().__init__()
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be `images` or `features`, got {inputs!r}")
        self.model = model
        self.recipe = recipe
        self.inputs = inputs
        self.eval_split = eval_split
        self.eval_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.epoch_losses: list[float] = []
        self.eval_accuracy: float | None = None
        # Per-epoch method statistics (e.g. equilibrium-solver iterations and residuals), for the result file.
        self.diagnostics: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        self._loss_sum: Tensor | None = None
        self._seen = 0
        self._eval_loss_sum: Tensor | None = None
        self._eval_seen = 0
        # Fused optimiser kernels keep the whole update on the device (the default implementations read
        # their step counters on the host); None: fused on a GPU.
        self.fused_optimizer: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(x) if self.inputs == "features" else self.model(x)

    @property
    def _logging(self) -> bool:
        """Whether the Trainer has a logger: then step losses and the evaluation loss are logged too."""
        return bool(self.loggers)

    # -- training --------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        # Accumulated on the device: reading the loss every step would synchronise with the host.
        self._loss_sum += loss.detach() * y.shape[0]
        self._seen += y.shape[0]
        # Only on the steps the Trainer writes to its logger (`self.log` costs as much as a small step computes;
        # without gradient accumulation, the logger connector's step count is `global_step`).
        if self._logging and (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        extra = self.model.regularization()
        return loss if extra is None else loss + extra

    def on_train_epoch_end(self) -> None:
        loss = (self._loss_sum / max(1, self._seen)).item()
        self.epoch_losses.append(loss)
        self.log("train/loss", loss, prog_bar=True)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss} in epoch {self.current_epoch}")
        self._record_diagnostics("train")

    def _record_diagnostics(self, phase: str) -> None:
        stats = self.model.pop_diagnostics()
        if not stats:
            return
        self.diagnostics[phase].append(stats)
        for key, value in stats.items():
            self.log(f"{phase}/{key}", value, prog_bar=key.endswith("iters"))
        bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
        if bad:
            raise NonFiniteLossError(f"non-finite {', '.join(bad)} in {phase}")

    # -- evaluation ------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._eval_loss_sum = torch.zeros((), device=self.device)
        self._eval_seen = 0

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.eval_acc.update(logits, y)
        if self._logging:
            self._eval_loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            self._eval_seen += y.shape[0]

    def on_test_epoch_end(self) -> None:
        self.eval_accuracy = 100.0 * self.eval_acc.compute().item()
        self.log(f"{self.eval_split}/acc", self.eval_accuracy)
        if self._logging:
            self.log(f"{self.eval_split}/loss", self._eval_loss_sum.item() / max(1, self._eval_seen))
        self.eval_acc.reset()
        self._record_diagnostics("eval")

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        r = self.recipe
        no_decay = {id(p) for p in self.model.no_weight_decay_parameters()}
        params = [p for p in self.model.trainable_parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in no_decay], "weight_decay": r.weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        fused = self.device.type == "cuda" if self.fused_optimizer is None else self.fused_optimizer
        if r.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, fused=fused or None)
        else:
            optimizer = torch.optim.AdamW(groups, lr=r.lr, fused=fused or None)
        scheduler = LambdaLR(optimizer, lambda epoch: r.lr_at(epoch) / r.lr)
        # `name`: the key under which a LearningRateMonitor logs the learning rate (`lr`, or `lr/pg1`, ... per group).
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "lr"}}
