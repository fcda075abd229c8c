"""GPS: Gradient-based Parameter Selection, top-K incoming weights per neuron chosen by a contrastive gradient.

Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024,
https://arxiv.org/abs/2312.10136; official code FightingFighting/GPS at 72e0c31 (`train_gps.py`,
`utils/pruning.py: prune_by_percentile_gradient_perCell`, `utils/loss_utils.py: SupConLoss`, `utils/cuda.py:
NativeScaler.maks_gradient`, `data/transforms_factory.py: transforms_contrastaug_train`,
`train_scripts/vit/vtab/*/train_gps.sh`).

Selection (a stage decided once per task from the pretrained model, `decides_from = "pretrained"`):

- Gradients: one pass over the task's training data, two augmented views of every image, the supervised
  contrastive loss (SupCon, Khosla et al. 2020: temperature 0.07 = base temperature, features L2-normalised,
  every view an anchor, positives = the other views of the same class) on the backbone's pooled pre-logits
  feature (the CLS token after the final LayerNorm: the code's `return_feature`; no projection head, the
  classification head plays no part: the paper's "head-free" loss). The code accumulates `.backward()` over all
  batches (a sum of per-batch mean losses) in `model.train()` (drop-path on), without zeroing in between.
- Views (the code's `--contrast-aug`): RandomResizedCrop(scale 0.08–1, ratio 3/4–4/3, bicubic) to the input
  size, horizontal flip 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale 0.2. Here they act
  on the already resized and normalised batches (the code crops the decoded image): the colour operations
  need pixels in [0, 1], so the batch is de-normalised with `aug_normalization` first (option; `augment=crop_flip`
  keeps only the geometric ones, which commute with the normalisation, `none` makes both views the image).
- Candidates: every weight matrix except norms, position embedding, CLS token and head, i.e. on a ViT the patch
  embedding's conv (as [out, in·kh·kw]) and every block's qkv, proj, fc1, fc2. For each output neuron (row), the
  K entries with the largest |accumulated gradient| (the code's `times_para`, one K for every layer; 1 on
  every VTAB task but Patch Camelyon, 2).
- Tuning: only the selected entries move (the code zeroes the other entries' gradients before Adam with
  weight decay 0, so they stay exactly at their pretrained values); here each layer is wrapped
  (`methods._sparse.SparselyTuned`) with one delta per selected entry added to its frozen weight in the forward
  (`SparseDelta` at flat positions row·fan_in + column, zero at init: the identity). The decision stores, per
  layer, the selected columns [out, K] under `backbone.<path>.sparse.index`. The code's mask
  also leaves every bias of those layers and the head fully trainable (the name rule `bias` → trained comes after
  `norm` → frozen, so LayerNorm γ and β stay frozen): `train_biases` (default on, the code's).
- A model built without the decision (contract tests, `--set` experiments) selects the K largest-magnitude
  pretrained weights per neuron instead: same shapes, same count.

Recipe (the 19 VTAB scripts): Adam, weight decay 0 (AdamW with decay 0 is the same update), per-task lr and batch
(16 or 32), 100 epochs + the code's 10 cool-down epochs at the floor (timm `create_scheduler`, left out here),
warm-up 10 epochs from 1e-7, cosine to 1e-8, per-task drop-path (0–0.2), AMP, timm's head init (truncated
normal 0.02, bias 0), no mixup/smoothing; `--no-aug --direct-resize`. SSF's trainer, like the code's, steps its
scheduler at epoch + 1 after each epoch; the suite's `timm-cosine` runs epoch e at the value for e − 1 (as for
SSF, one epoch behind). Per-task lr, batch, drop-path and K are applied by `for_task` (`per_task`). The grid
protocol searches lr {3e-4, 1e-3, 3e-3, 1e-2} (the scripts' range) at weight decay 0: the suite's choice.
The scripts were updated after release (GPS#4, Oct 2024: the authors say CIFAR-100 was run in VPT's code base and
suggest searching lr, batch and `times_para`; users report lower numbers than the paper's on CIFAR-100, Flowers
and Pets with the scripts).

Parameters: K·Σ out over the selected layers, plus (`train_biases`) their biases, Σ out again: on ViT-B/16
Σ out = 768 + 12·(2304 + 768 + 3072 + 768) = 83,712, so 167,424 at K = 1 (251,136 at K = 2), plus the head
769·C. Averaged over the 19 VTAB tasks (C = 2…397; K = 2 on Camelyon) that is 0.21 M, the paper's table says
0.22 M.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.transforms import v2

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, PruneCandidate, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._inject import replace_module
from methods._per_task import PerTaskSettings
from methods._registry import register_method
from methods._sparse import SparseDelta, SparselyTuned

# (batch, lr, drop-path, K) of `train_scripts/vit/vtab/<task>/train_gps.sh`.
GPS_TASKS: dict[str, tuple[int, float, float, int]] = {
    "cifar100": (32, 1e-2, 0.0, 1), "caltech101": (16, 2e-3, 0.0, 1), "dtd": (16, 2e-3, 0.0, 1),
    "flowers102": (16, 2e-3, 0.0, 1), "pets": (32, 3e-3, 0.0, 1), "svhn": (32, 5e-3, 0.0, 1),
    "sun397": (16, 2.5e-3, 0.0, 1), "camelyon": (32, 4e-3, 0.0, 2), "eurosat": (16, 2e-3, 0.0, 1),
    "resisc45": (16, 1.5e-3, 0.1, 1), "retinopathy": (32, 2e-3, 0.2, 1), "clevr_count": (16, 3e-4, 0.1, 1),
    "clevr_dist": (16, 2e-3, 0.1, 1), "dmlab": (16, 1.5e-3, 0.1, 1), "kitti": (16, 1e-3, 0.0, 1),
    "dsprites_loc": (32, 7e-3, 0.0, 1), "dsprites_ori": (16, 5e-4, 0.2, 1), "smallnorb_azi": (32, 3e-3, 0.1, 1),
    "smallnorb_ele": (32, 3e-4, 0.2, 1),
}  # fmt: skip
GPS_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
AUGMENTS = ("contrast", "crop_flip", "none")
NORMALIZATIONS = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def gps_recipe(batch_size: int = 32, lr: float = 2e-3) -> Recipe:
    return Recipe(
        optimizer="adamw", lr=lr, weight_decay=0.0, batch_size=batch_size, epochs=100, warmup_epochs=10,
        warmup_start_lr=1e-7, min_lr=1e-8, schedule="timm-cosine", drop_last=True,
        lr_grid=GPS_LR_GRID, wd_grid=(0.0,),
    )  # fmt: skip


def candidate_layers(vit: nn.Module, patch_embed: bool = True) -> dict[str, nn.Linear | nn.Conv2d]:
    """Module path -> the layers whose weights GPS selects from: the patch embedding's conv (with `patch_embed`)
    and every Linear inside the blocks (qkv, proj, fc1, fc2 on timm's ViT), in module order."""
    layers: dict[str, nn.Linear | nn.Conv2d] = {}
    if patch_embed:
        layers["patch_embed.proj"] = vit.patch_embed.proj
    for name, m in vit.blocks.named_modules():
        if isinstance(m, nn.Linear):
            layers[f"blocks.{name}"] = m
    return layers


def fan_in(layer: nn.Module) -> int:
    return layer.weight[0].numel()


def top_k_columns(scores: Tensor, k: int) -> Tensor:
    """Per row of `scores` [out, ...] (flattened to [out, in]), the columns of its k largest entries, ascending."""
    return scores.reshape(scores.shape[0], -1).topk(k, dim=1).indices.sort(dim=1).values


def flat_positions(columns: Tensor, fan_in: int) -> Tensor:
    """Columns [out, K] of a weight [out, fan_in] as flat positions row·fan_in + column ([out·K], row-major)."""
    rows = torch.arange(columns.shape[0], device=columns.device).unsqueeze(1)
    return (rows * fan_in + columns.to(torch.int64)).flatten()


class SelectedBiases(TunableModule):
    """The selected layers' own bias tensors, registered here too (shared, not copied), as BitFit's."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.biases = nn.ParameterDict(
            {name.replace(".", "_"): m.bias for name, m in layers.items() if m.bias is not None}
        )


class GPSModel(PeftModel):
    def __init__(self, backbone: VisionTransformer, num_classes: int, config: GPSConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.k = config.k
        self.wrapped: dict[str, SparselyTuned] = {}
        layers = candidate_layers(backbone, config.patch_embed)
        for path, layer in layers.items():
            with torch.no_grad():  # no decision yet: the K largest-magnitude pretrained weights per neuron
                index = flat_positions(top_k_columns(layer.weight.abs(), config.k), fan_in(layer))
            wrapper = SparselyTuned(layer, {"weight": SparseDelta(index)})
            replace_module(backbone, path, wrapper)
            self.wrapped[path] = wrapper
        self.gps_biases = SelectedBiases(layers) if config.train_biases else None

    def selection_state(self) -> dict[str, Tensor]:
        """The selection as `apply_pruning` takes it (the decision files' format): `backbone.<path>.sparse.index`
        -> the selected columns [out, K] of each layer."""
        state = {}
        for path, w in self.wrapped.items():
            index = w.deltas["weight"].index
            state[f"backbone.{path}.sparse.index"] = (index % fan_in(w.module)).view(-1, self.k)
        return state

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        expected = self.selection_state()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"GPS selection does not match the model: missing {missing}, unexpected {unexpected}")
        for path, wrapper in self.wrapped.items():
            key, n = f"backbone.{path}.sparse.index", fan_in(wrapper.module)
            index = state[key]
            if index.shape != expected[key].shape:
                raise ValueError(f"selection shape {tuple(index.shape)} != {tuple(expected[key].shape)}")
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < n:
                raise ValueError(f"GPS selection of {path}: columns outside [0, {n})")
            delta = wrapper.deltas["weight"]
            delta.set_index(flat_positions(index.to(delta.index.device), n))

    def merged_backbone(self) -> VisionTransformer:
        merged = copy.deepcopy(self.backbone)
        for path in self.wrapped:
            replace_module(merged, path, merged.get_submodule(path).folded())
        return merged


# -- the selection -------------------------------------------------------------------------------------------------
def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss of `features` [B, V, D] (V views per sample), every view an anchor.

    For anchor i among the N = B·V views: −(τ/τ_b) · mean over its positives p (same label, p ≠ i) of
    log(exp(z_i·z_p/τ) / Σ_{a ≠ i} exp(z_i·z_a/τ)), with z L2-normalised; the loss is the mean over anchors.
    """
    b, v = features.shape[:2]
    z = F.normalize(features.reshape(b, v, -1), dim=-1).transpose(0, 1).reshape(b * v, -1)  # view-major, as SupCon
    y = labels.repeat(v)
    logits = z @ z.T / temperature
    self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
    log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


class TwoViews:
    """Two random views of every image of a normalised batch [B, 3, H, W] -> [2B, 3, H, W] (all first views, then
    all second views), drawn image by image from torch's global random state."""

    def __init__(self, augment: str, normalization: str) -> None:
        self.augment = augment
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS[normalization])
        self.colour = v2.Compose([
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
        ])  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        if self.augment == "none":
            return torch.cat([x, x])
        geometric = v2.Compose([
            v2.RandomResizedCrop(list(x.shape[-2:]), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ])  # fmt: skip
        mean, std = self.mean.to(x), self.std.to(x)
        views = []
        for _ in range(2):
            for image in x:
                image = geometric(image)
                if self.augment == "contrast":
                    image = (self.colour((image * std + mean).clamp(0.0, 1.0)) - mean) / std
                views.append(image)
        return torch.stack(views)


@torch.enable_grad()
def contrastive_gradients(
    model: GPSModel, batches: Iterable[tuple[Tensor, ...]], views: TwoViews, temperature: float
) -> tuple[dict[str, Tensor], float, int]:
    """Σ over batches of ∂SupCon/∂W for every selected layer's frozen weight W (model in training mode, as the code),
    with the mean loss and the number of batches. Nothing of the model changes (no `.grad`, flags restored)."""
    weights = {path: w.module.weight for path, w in model.wrapped.items()}
    flags = {path: w.requires_grad for path, w in weights.items()}
    was_training = model.training
    totals = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    loss_sum, n = 0.0, 0
    try:
        model.train()
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            x, y = batch[0], batch[1]
            features = model.forward_features(views(x))
            loss = supcon_loss(features.view(2, x.shape[0], -1).transpose(0, 1), y, temperature, temperature)
            grads = torch.autograd.grad(loss, list(weights.values()))
            for path, g in zip(weights, grads, strict=True):
                totals[path] += g.float()
            loss_sum += float(loss.detach())
            n += 1
    finally:
        for path, w in weights.items():
            w.requires_grad_(flags[path])
        model.train(was_training)
    if n == 0:
        raise ValueError("GPS's selection needs at least one batch of training data")
    return totals, loss_sum / n, n


@register_method("gps")
@dataclass
class GPSConfig(PerTaskSettings, MethodConfig):
    """GPS: per neuron, the K incoming weights with the largest contrastive gradient are tuned (+ biases, head).

    Attributes:
        k: weights tuned per output neuron of every selected layer (the code's `times_para`).
        patch_embed: select in the patch embedding's conv too (the code does).
        train_biases: train every bias of the selected layers fully (the code's mask does).
        temperature: SupCon's temperature (= its base temperature, 0.07 in the code).
        augment: the two views: `contrast` (the code's crop, flip, colour jitter, grayscale), `crop_flip`, `none`.
        aug_normalization: how the batches the selection sees were normalised (to undo it for the colour
            operations): `imagenet` (the suite's default), `inception`, `clip` or `none`.
        drop_path_rate: the backbone's stochastic depth (per task in the code).
        head_init: `trunc_normal` (timm's, the code's), `torch` or `vpt`.
        per_task: apply the scripts' per-task batch, lr, drop-path and K in `for_task`.
    """

    category: ClassVar[str] = "selection"
    identity_at_init: ClassVar[bool] = True
    decides_from: ClassVar[str] = "pretrained"
    needs: ClassVar[str] = "a ViT's patch-embedding conv and block Linears (timm's VisionTransformer)"

    recipe: Recipe = field(default_factory=gps_recipe)
    k: int = 1
    patch_embed: bool = True
    train_biases: bool = True
    temperature: float = 0.07
    augment: str = "contrast"
    aug_normalization: str = "imagenet"
    drop_path_rate: float = 0.0
    head_init: str = "trunc_normal"
    per_task: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS, "augment": AUGMENTS, "aug_normalization": tuple(NORMALIZATIONS)})
        _checks.integer(self, "k", 1)
        _checks.real(self, "temperature", 0.0, low_open=True)
        _checks.rates(self, "drop_path_rate")

    def check_backbone(self, backbone: Backbone) -> None:
        path, smallest = min(
            ((p, fan_in(m)) for p, m in candidate_layers(backbone, self.patch_embed).items()), key=lambda t: t[1]
        )
        if self.k > smallest:
            raise _checks.invalid(self, "k", f"exceeds the {smallest} inputs per neuron of {path}", smallest)

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def task_values(self, task_id: str) -> dict[str, Any]:
        if task_id not in GPS_TASKS:
            return {}
        batch, lr, drop_path, k = GPS_TASKS[task_id]
        return {"recipe": gps_recipe(batch, lr), "drop_path_rate": drop_path, "k": k}

    @classmethod
    def tiny(cls) -> Self:
        return cls(k=2)

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        return GPSModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        outs = [m.weight.shape[0] for m in candidate_layers(backbone, self.patch_embed).values()]
        biases = sum(
            m.bias.numel() for m in candidate_layers(backbone, self.patch_embed).values() if m.bias is not None
        )
        return backbone_report(backbone, num_classes, self.k * sum(outs) + (biases if self.train_biases else 0))

    # -- the selection stage ---------------------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        return True

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        if not isinstance(model, GPSModel):
            raise TypeError("GPS's selection needs a GPS model")
        grads, loss, n = contrastive_gradients(model, batches, TwoViews(self.augment, self.aug_normalization),
                                               self.temperature)  # fmt: skip
        state = {f"backbone.{path}.sparse.index": top_k_columns(g.abs(), self.k).cpu() for path, g in grads.items()}
        default = model.selection_state()
        overlap = sum(int((a.cpu() == state[key]).all(1).sum()) for key, a in default.items())
        info = {
            "k": self.k,
            "layers": len(state),
            "selected_weights": sum(int(v.numel()) for v in state.values()),
            "selection_loss": round(loss, 6),
            "selection_batches": n,
            # Neurons whose selection equals the default (largest pretrained magnitudes): a sanity figure.
            "neurons_as_default": overlap,
        }
        return [PruneCandidate(f"top{self.k}", state, info)]
