"""The method contract: a typed config that builds a `PeftModel` around a frozen timm ViT.

A method is one file in `methods/` holding a `@register_method`-decorated `MethodConfig` subclass
(the paper's defaults, its recipe and its parameter formula) and the modules it adds. Its model:

- maps a batch of normalised images [B, 3, H, W] to logits [B, C] (`forward`), in two halves:
  `forward_features` (everything up to the pooled pre-logits feature) and `forward_head`;
- owns its tunable parameters structurally: they live in `TunableModule` instances (or in the
  modules `tunable_modules()` returns), never found by matching parameter names;
- leaves every other backbone weight frozen (`requires_grad=False`); the head is always trained;
- reports its parameters (`param_report`) and saves/loads only its tunable state plus the head.

The backbone is timm's `VisionTransformer` or `SwinTransformer`, unmodified (`methods/_family.py`: a method lists the
families it supports); methods attach to it through shared helpers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from methods import _checks
from methods._family import FAMILY_TITLES, Backbone, family
from methods._recipe import OPTIMIZERS, SCHEDULES, Recipe  # noqa: F401 (Recipe's home is _recipe.py)
from methods._report import ParamReport

HEAD_INITS = ("vpt", "torch", "trunc_normal")
# Method families (`MethodConfig.category`): prompt (tokens or input prompts), adapter (modules kept at inference),
# reparam (folds into the weights), selection (what to tune is searched per task), peft (HF peft tuners), baseline.
CATEGORIES = ("prompt", "adapter", "reparam", "selection", "peft", "baseline", "other")
# VPT's head bias: -log((1 - p) / p) with prior probability p = 0.01.
VPT_HEAD_BIAS = -math.log((1 - 0.01) / 0.01)


class NotMergeableError(ValueError):
    """The method's modules cannot be folded into the backbone's weights (extra tokens, non-linear branches)."""


class TunableModule(nn.Module):
    """Marker base class: every module a method adds to the model derives from it, and is trained."""


def init_head(head: nn.Linear, how: str) -> None:
    """Initialise the linear head: `vpt` (kaiming-normal fan_out, bias -4.5951), `torch`, `trunc_normal` (NOAH's)."""
    if how == "vpt":
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        nn.init.constant_(head.bias, VPT_HEAD_BIAS)
    elif how == "torch":
        head.reset_parameters()
    elif how == "trunc_normal":  # weight truncated-normal std 0.02, bias 0
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    else:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {how!r}")


class PeftModel(nn.Module):
    """A frozen timm ViT plus what a method adds, plus a linear head on the pooled feature.

    Subclasses add their modules (as `TunableModule`s) and override `forward_features` where the
    method changes the token path. The backbone must be created with `num_classes=0`.
    """

    # True when everything before the head is frozen and deterministic, so that the runner may compute
    # features once per split and train the head alone on them.
    features_frozen: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, num_classes: int, *, head_init: str = "vpt") -> None:
        super().__init__()
        family(backbone)  # a TypeError for anything but a timm ViT or Swin
        head = getattr(backbone.head, "fc", backbone.head)  # Swin's ClassifierHead holds its Linear as `fc`
        if not isinstance(head, nn.Identity):
            raise ValueError("create the backbone with num_classes=0: the model owns its head")
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        init_head(self.head, head_init)

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> pooled pre-logits feature [B, D]."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_head(self, features: Tensor) -> Tensor:
        """Pooled feature [B, D] -> logits [B, C]."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def regularization(self) -> Tensor | None:
        """An extra term the training loss adds (e.g. LION's robust-training L1 penalty); None for none."""
        return None

    def pop_diagnostics(self) -> dict[str, float]:
        """Method statistics accumulated since the last call, averaged (e.g. solver iterations and residuals).

        The training loop calls it once per epoch (training and evaluation separately), so methods can
        accumulate on the device without synchronising with the host at every step.
        """
        return {}

    # -- what is trained ---------------------------------------------------------------------------
    def tunable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the method trains (head excluded): by default every `TunableModule`."""
        return [m for m in self.modules() if isinstance(m, TunableModule)]

    def tunable_parameters(self) -> list[nn.Parameter]:
        return _unique_parameters(self.tunable_modules())

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in the current stage but not counted as tunable (e.g. E2VPT's soft masks)."""
        return []

    def state_modules(self) -> list[nn.Module]:
        """Modules whose state a checkpoint holds besides the tunable modules and head (e.g. pruning masks)."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Tunable parameters, the head's, and the auxiliary ones."""
        params = _unique_parameters([*self.tunable_modules(), self.head])
        seen = {id(p) for p in params}
        return params + [p for p in self.auxiliary_parameters() if id(p) not in seen]

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors excluded from weight decay (VPT convention: the head bias)."""
        return [self.head.bias]

    def mark_trainable(self) -> None:
        """Freeze everything, then let gradients reach the tunable parameters and the head."""
        self.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    # -- parameter report --------------------------------------------------------------------------
    def nonzero_tunable(self) -> int:
        """Tunable parameters that survive pruning; methods with masks override this."""
        return sum(p.numel() for p in self.tunable_parameters())

    def param_report(self) -> ParamReport:
        added = {id(p) for m in self.backbone.modules() if isinstance(m, TunableModule) for p in m.parameters()}
        return ParamReport(
            tunable=sum(p.numel() for p in self.tunable_parameters()),
            head=sum(p.numel() for p in self.head.parameters()),
            backbone=sum(p.numel() for p in self.backbone.parameters() if id(p) not in added),
            nonzero_tunable=self.nonzero_tunable(),
        )

    # -- tunable state -------------------------------------------------------------------------------
    def tunable_state_dict(self) -> dict[str, Tensor]:
        """State (parameters and persistent buffers) of the tunable modules, the head and `state_modules`."""
        paths = {id(m): name for name, m in self.named_modules()}
        state: dict[str, Tensor] = {}
        for module in [*self.tunable_modules(), self.head, *self.state_modules()]:
            prefix = paths[id(module)]
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}" if prefix else key] = value
        return state

    def load_tunable_state_dict(self, state: dict[str, Tensor], *, partial: bool = False) -> None:
        """Load a `tunable_state_dict`; the keys must match exactly (or, with `partial`, be a subset)."""
        expected = self.tunable_state_dict()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if (missing and not partial) or unexpected:
            raise ValueError(f"tunable state does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for key, target in expected.items():
                if key not in state:
                    continue
                if target.shape != state[key].shape:
                    raise ValueError(f"tunable state {key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}")
                target.copy_(state[key])

    def save_tunable(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the tunable state (plus head) to a safetensors file, atomically (temporary file, then rename)."""
        path = Path(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.tunable_state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(state, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_tunable(self, path: str | Path) -> None:
        self.load_tunable_state_dict(load_file(str(path)))

    # -- merging for inference ---------------------------------------------------------------------
    def merged_backbone(self) -> Backbone:
        """A plain timm `VisionTransformer` (a new module; this model is left unchanged) whose frozen weights
        have the method folded in, so that `head(merged_backbone().forward_head(forward_features(x),
        pre_logits=True))` equals this model's logits and costs exactly the frozen backbone's forward.

        Re-parameterisable methods override this; the others raise `NotMergeableError`, whose message says
        why in one line.
        """
        raise NotMergeableError(
            f"{type(self).__name__} adds modules that cannot be folded into the backbone's weights"
        )

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        """Fix the outcome of a pruning stage (masks, and values to rewind to) for the next training run."""
        raise NotImplementedError(f"{type(self).__name__} has no pruning stage")


@dataclass(frozen=True)
class PruneCandidate:
    """One outcome of a pruning decision, to be trained from scratch and compared on the validation split.

    Attributes:
        key: a short file-name-safe id, e.g. `tok3-seg4`.
        state: tensors for `PeftModel.apply_pruning` on a freshly built model (keys of its tunable state).
        info: what the result files record about it (levels, counts of surviving weights, ...).
        preference: among equal validation accuracies, the larger preference wins.
    """

    key: str
    state: dict[str, Tensor]
    info: dict[str, Any]
    preference: tuple[float, ...] = ()


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@dataclass
class MethodConfig:
    """Base class of every method's config: its fields are the method's hyperparameters (paper defaults).

    Subclasses implement `create` (build the model), `expected_params` (the parameter formula the
    contract tests check the built model against) and give `recipe` a default.

    Attributes:
        recipe: the training recipe (the paper's, or the suite's choice where the paper gives none).
    """

    name: ClassVar[str] = ""
    # Whether logits at initialisation equal those of the frozen backbone plus the same head (a config whose
    # answer depends on its fields overrides this with a property).
    identity_at_init: ClassVar[bool] = False
    # The method's training semantics: bumped whenever a change alters what a run with the same config trains
    # (an initialisation, a loss term, a drop-path). Part of a run's identity (`method_version` in its config),
    # so results trained under another version are never resumed as if they were this one's.
    version: ClassVar[int] = 1
    # The method's family on the leaderboard's plots (one colour per family, `CATEGORIES`): a plugin method that
    # sets none still plots, as `other`.
    category: ClassVar[str] = "other"

    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        """Check the fields (every field its annotated type, here); subclasses add their own checks after calling
        this: a `ValueError` saying what is wrong and what to set (see `methods._checks`)."""
        _checks.field_types(self)

    # The backbone families (`methods._family.FAMILIES`) the method attaches to, and what it needs of a backbone
    # (said when it is built on another family).
    families: ClassVar[tuple[str, ...]] = ("vit",)
    needs: ClassVar[str] = "a ViT's token sequence and blocks (timm's VisionTransformer)"

    # -- to override ---------------------------------------------------------------------------------
    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        """Wrap `backbone` (created with `num_classes=0`) into this method's model."""
        raise NotImplementedError

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        """The method's parameter formula, evaluated for this backbone and class count."""
        raise NotImplementedError

    # What the pruning stage decides from (`prune_candidates`): `trained`, a dense run trained first (E²VPT's
    # pruning, NOAH's supernet); `pretrained`, the freshly built model and the task's training data (SCT's channels,
    # GPS's and SPT's weights). A `pretrained` decision is made before the grid, and every run of the task carries it.
    decides_from: ClassVar[str] = "trained"
    # The tune mode's split whose batches `prune_candidates` gets: `train` (train800) or `eval` (val200: NOAH's search).
    decides_on: ClassVar[str] = "train"

    @property
    def prunes(self) -> bool:
        """Whether this config runs a pruning stage (the runner then calls `prune_candidates`)."""
        return False

    @property
    def trains_dense(self) -> bool:
        """Whether the pruning stage starts with a dense training run."""
        return self.prunes and self.decides_from == "trained"

    def dense_config(self) -> Self:
        """The config of the pruning stage's dense run (by default this one; NOAH's supernet trains longer)."""
        return self

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        """Decide what to prune from a model trained in the dense stage.

        Args:
            model: the dense-stage model, trained on the selection split (train800).
            initial_state: its tunable state before that training (for rewinding).
            batches: normalised (images, labels) batches of the selection split's training data.
        """
        raise NotImplementedError(f"{self.name} has no pruning stage")

    def check_family(self, backbone: Backbone) -> None:
        """Raise `ValueError` (one line naming the method, the backbone's family and what the method needs) unless
        the method attaches to `backbone`'s family (`families`)."""
        kind = family(backbone)
        if kind not in self.families:
            raise ValueError(
                f"{self.name} cannot attach to a {FAMILY_TITLES[kind]} backbone ({type(backbone).__name__}): "
                f"it needs {self.needs}; pick a {' or '.join(FAMILY_TITLES[f] for f in self.families)} backbone"
            )

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise `ValueError` (one line: what is wrong, what to set instead) when this config cannot be built
        on `backbone` (e.g. a width its segments do not divide). Field checks that need no backbone belong in
        `__post_init__`. Called before any work starts, so a sweep never records runs that could not build."""

    def backbone_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `timm.create_model` (e.g. a drop-path rate the method specifies)."""
        return {}

    def for_task(self, task_id: str) -> Self:
        """This config with the method's per-task settings applied (by default: unchanged)."""
        return self

    @classmethod
    def tiny(cls) -> Self:
        """A config that fits tiny test backbones (by default: the paper defaults)."""
        return cls()

    # -- provided ------------------------------------------------------------------------------------
    def build(self, backbone: Backbone, num_classes: int) -> PeftModel:
        """Create the model and freeze everything but the tunable parameters and the head."""
        self.check_family(backbone)
        self.check_backbone(backbone)
        model = self.create(backbone, num_classes)
        model.mark_trainable()
        return model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.name}: unknown config keys {unknown}; known: {sorted(names)}")
        data = dict(data)
        if isinstance(data.get("recipe"), dict):
            data["recipe"] = Recipe(**data["recipe"])
        return cls(**data)

    def check_choices(self, choices: dict[str, tuple[Any, ...]]) -> None:
        """Raise `ValueError` unless each named field holds one of its allowed values."""
        for name, allowed in choices.items():
            _checks.choice(self, name, allowed)

    def with_options(self, options: dict[str, str]) -> Self:
        """A copy with fields set from text (`--set key=value`), each converted to the field's type."""
        hints = _checks.type_hints(type(self))
        changes: dict[str, Any] = {}
        for key, text in options.items():
            if key not in hints or key == "recipe" or key not in {f.name for f in fields(self)}:
                known = sorted(f.name for f in fields(self) if f.name != "recipe")
                raise ValueError(f"{self.name} has no option {key!r}; options: {', '.join(known)}")
            changes[key] = _checks.parse_option(key, text, hints[key])
        return dataclasses.replace(self, **changes)

    def with_recipe(self, **overrides: Any) -> Self:
        """A copy whose recipe has `overrides` (keys equal to `None` are ignored)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, recipe=dataclasses.replace(self.recipe, **overrides))
