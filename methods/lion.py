"""LION: two equilibrium implicit layers around the frozen backbone, pruned as a lottery ticket.

Wang et al., "LION: Implicit Vision Prompt Tuning", AAAI 2024, https://arxiv.org/abs/2303.09992. There is
no official code, so this module is the suite's reconstruction (the spec's §2), every open choice an option.

From the paper: two deep-equilibrium layers (z* = f(z*, x)), one in front of the frozen backbone whose
prompt is fused with the image, one behind it whose prompt is fused with the output feature, then a
fully connected head; the layers' weights are pruned following the lottery-ticket hypothesis; "robust
training" pushes the weights below a threshold toward zero.

Ours (the reconstruction):
- Input layer, on the normalised image x: z* = tanh(A ∗ z* + GN(B ∗ x)) with c = 8 channels (`in_norm`:
  `injection`, or `sum` = tanh(GN(A ∗ z + B ∗ x)), or `none`); prompt = O ∗ z* (1×1 conv, zero init);
  the backbone reads x + prompt.
- Output layer, on the pooled feature h: z* = tanh(W·z* + U·h + b) with r = 64; h' = h + V·z* (V zero
  init); the head reads h'. With O = V = 0 the model starts exactly at backbone + head.
- Contractivity: the z→z maps are rescaled to a Lipschitz bound γ = 0.9 at every forward: W by its exact
  spectral norm; A by a rigorous bound on the norm of the zero-padded convolution operator — the
  largest singular value over the frequencies of the circular convolution on the grid enlarged by the
  padding (`lipschitz=operator`), or k·‖A as a [c, c·k²] matrix‖₂ (`lipschitz=kernel`). tanh is
  1-Lipschitz, so both maps are γ-contractions (with `in_norm` `injection` or `none`; GroupNorm around
  the z-path (`sum`) voids the guarantee and leaves the solver residual as the only check).
- Solving with torchdeq: Anderson (or fixed-point iteration) from z = 0 to a relative residual of 1e-4
  (at most 30 iterations); gradients by implicit differentiation (adjoint solved by fixed-point
  iteration) or, as an option, the phantom / k-step gradient. Iterations and residuals of both layers,
  forward and backward, are averaged per epoch into the logs and the result file.
- Lottery ticket (runner-driven, as E²VPT's stage): dense training with robust training on (λ·Σ|w| over
  the weights below the ρ-quantile of |w| of their tensor, recomputed each step); prune the
  smallest-magnitude fraction ρ = 0.5 of each weight tensor (A, B, O, W, U, V; `scope=global` ranks all
  together); rewind every parameter of both layers, and the head, to its initial value (pruned entries
  to 0); retrain with the masks fixed (masked entries get no gradient, stay exactly 0, and the Lipschitz
  bound is taken on the masked weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchdeq import get_deq

from methods import _checks
from methods._base import (
    HEAD_INITS,
    MethodConfig,
    ParamReport,
    PeftModel,
    PruneCandidate,
    Recipe,
    TunableModule,
)
from methods._family import backbone_report
from methods._lipschitz import conv_operator_bound, kernel_bound
from methods._registry import register_method


class _SolverStats:
    """Forward and backward solver statistics summed on the device, averaged on request."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def _add(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + value.detach().float().mean()
        self.counts[key] = self.counts.get(key, 0) + 1

    def forward(self, info: dict[str, Tensor]) -> None:
        self._add("f_iters", info["nstep"])
        self._add("f_residual", info["rel_lowest"])
        self._add("f_unconverged", (info["rel_lowest"] > self.tol).float())

    def backward(self, info: dict[str, Tensor]) -> None:
        self._add("b_iters", info["nstep"])
        self._add("b_residual", info["rel_lowest"])

    def pop(self) -> dict[str, float]:
        out = {k: (self.sums[k] / self.counts[k]).item() for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class ImplicitLayer(TunableModule):
    """What both layers share: the equilibrium solver, its statistics, masks on the prunable weights."""

    prunable: ClassVar[tuple[str, ...]]

    def __init__(self, config: LIONConfig) -> None:
        super().__init__()
        self.gamma = config.gamma
        self.deq = get_deq(
            f_solver=config.solver, f_max_iter=config.max_iter, f_tol=config.tol, f_stop_mode="rel",
            b_solver="fixed_point_iter", b_max_iter=config.backward_max_iter, b_tol=config.backward_tol,
            b_stop_mode="rel", ift=config.gradient == "implicit", grad=config.phantom_steps,
        )  # fmt: skip
        self.stats = _SolverStats(config.tol)

    def _register_masks(self) -> None:
        for name in self.prunable:
            self.register_buffer(f"{name}_mask", torch.ones_like(getattr(self, name).weight))

    def masked(self, name: str) -> Tensor:
        """The weight of sub-module `name` with its pruning mask applied."""
        return getattr(self, name).weight * getattr(self, f"{name}_mask")

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name).weight for name in self.prunable}

    def solve(self, f, z0: Tensor) -> Tensor:
        """The fixed point of `f` from `z0` (differentiable as configured), recording solver statistics."""
        z, info = self.deq(f, z0, backward_writer=self.stats.backward if self.training else None)
        self.stats.forward(info)
        return z[-1]


class InputImplicitLayer(ImplicitLayer):
    """Image [B, 3, H, W] -> image + O ∗ z*, with z* = tanh(A ∗ z* + GN(B ∗ x)) (or the `in_norm` variants)."""

    prunable = ("A", "B", "O")

    def __init__(self, config: LIONConfig) -> None:
        super().__init__(config)
        c = config.in_channels
        self.A = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.B = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(config.in_groups, c) if config.in_norm != "none" else nn.Identity()
        self.O = nn.Conv2d(c, 3, 1)
        nn.init.zeros_(self.O.weight)
        nn.init.zeros_(self.O.bias)
        self.in_norm, self.lipschitz = config.in_norm, config.lipschitz
        self._register_masks()

    def contracted_A(self, size: tuple[int, int]) -> Tensor:
        """A (masked) rescaled so that its operator norm on `size` is at most γ."""
        a = self.masked("A")
        # A constant factor within a step (as a projection): gradients do not flow through the bound.
        with torch.no_grad():
            bound = conv_operator_bound(a, size) if self.lipschitz == "operator" else kernel_bound(a)
        return a * torch.clamp(self.gamma / bound.clamp_min(1e-12), max=1.0)

    def forward(self, x: Tensor) -> Tensor:
        a = self.contracted_A(x.shape[-2:])
        injection = F.conv2d(x, self.masked("B"), self.B.bias, padding=1)
        if self.in_norm == "sum":

            def f(z: Tensor) -> Tensor:
                return torch.tanh(self.norm(F.conv2d(z, a, padding=1) + injection))
        else:
            injection = self.norm(injection)

            def f(z: Tensor) -> Tensor:
                return torch.tanh(F.conv2d(z, a, padding=1) + injection)

        z = self.solve(f, torch.zeros_like(injection))
        return x + F.conv2d(z, self.masked("O"), self.O.bias)


class OutputImplicitLayer(ImplicitLayer):
    """Feature [B, D] -> h + V·z*, with z* = tanh(W·z* + U·h + b)."""

    prunable = ("W", "U", "V")

    def __init__(self, dim: int, config: LIONConfig) -> None:
        super().__init__(config)
        r = config.out_dim
        self.W = nn.Linear(r, r, bias=False)
        self.U = nn.Linear(dim, r, bias=False)
        self.b = nn.Parameter(torch.zeros(r))
        self.V = nn.Linear(r, dim, bias=False)
        nn.init.zeros_(self.V.weight)
        self._register_masks()

    def contracted_W(self) -> Tensor:
        w = self.masked("W")
        return w * torch.clamp(self.gamma / torch.linalg.matrix_norm(w.detach(), ord=2).clamp_min(1e-12), max=1.0)

    def forward(self, h: Tensor) -> Tensor:
        w = self.contracted_W()
        injection = F.linear(h, self.masked("U")) + self.b

        def f(z: Tensor) -> Tensor:
            return torch.tanh(F.linear(z, w) + injection)

        z = self.solve(f, torch.zeros_like(injection))
        return h + F.linear(z, self.masked("V"))


class LIONModel(PeftModel):
    """Input implicit layer -> frozen backbone -> output implicit layer -> head."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: LIONConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.input_layer = InputImplicitLayer(config) if config.use_input_layer else None
        self.output_layer = OutputImplicitLayer(backbone.num_features, config) if config.use_output_layer else None
        self.config = config
        self.pruned = False

    def layers(self) -> dict[str, ImplicitLayer]:
        return {k: v for k, v in (("in", self.input_layer), ("out", self.output_layer)) if v is not None}

    def forward_features(self, x: Tensor) -> Tensor:
        if self.input_layer is not None:
            x = self.input_layer(x)
        h = super().forward_features(x)
        return self.output_layer(h) if self.output_layer is not None else h

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        return {f"{k}.{n}": w for k, layer in self.layers().items() for n, w in layer.prunable_weights().items()}

    def regularization(self) -> Tensor | None:
        """Robust training: λ·Σ|w| over each prunable weight's entries below its threshold."""
        c = self.config
        if c.robust_strength == 0 or (self.pruned and c.robust_phases == "dense"):
            return None
        total = 0.0
        for weight in self.prunable_weights().values():
            magnitude = weight.abs()
            if c.robust_threshold_mode == "quantile":
                threshold = torch.quantile(magnitude.detach().flatten().float(), c.prune_fraction)
            else:
                threshold = c.robust_threshold
            total = total + magnitude[magnitude < threshold].sum()
        return c.robust_strength * total

    def pop_diagnostics(self) -> dict[str, float]:
        return {f"{k}/{stat}": v for k, layer in self.layers().items() for stat, v in layer.stats.pop().items()}

    def nonzero_tunable(self) -> int:
        masks = {id(getattr(layer, name).weight): getattr(layer, f"{name}_mask")
                 for layer in self.layers().values() for name in layer.prunable}  # fmt: skip
        return sum(int(masks[id(p)].count_nonzero()) if id(p) in masks else p.numel()
                   for p in self.tunable_parameters())  # fmt: skip

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        self.load_tunable_state_dict(state, partial=True)
        self.pruned = True
        self.mark_trainable()


def magnitude_masks(weights: dict[str, Tensor], fraction: float, scope: str) -> dict[str, Tensor]:
    """Binary masks removing exactly round(fraction·n) smallest-magnitude entries per tensor (or over all)."""

    def smallest(values: Tensor, k: int) -> Tensor:
        keep = torch.ones(values.numel(), dtype=torch.bool)
        keep[torch.argsort(values.flatten(), stable=True)[:k]] = False
        return keep

    if scope == "per_tensor":
        return {name: smallest(w.detach().abs(), round(fraction * w.numel())).view_as(w).float()
                for name, w in weights.items()}  # fmt: skip
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = smallest(flat, round(fraction * flat.numel()))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start : start + w.numel()].view_as(w).float()
        start += w.numel()
    return out


@register_method("lion")
@dataclass
class LIONConfig(MethodConfig):
    """LION settings (the suite's reconstruction; see the module docstring).

    Attributes:
        in_channels: c, channels of the input layer's state.
        in_groups: GroupNorm groups (must divide `in_channels`).
        in_norm: `injection` (GN on B ∗ x), `sum` (GN on A ∗ z + B ∗ x; no contraction guarantee) or `none`.
        out_dim: r, size of the output layer's state.
        gamma: the Lipschitz bound of both z→z maps.
        lipschitz: bound of the conv A: `operator` (Fourier bound of the zero-padded operator) or `kernel`.
        solver: torchdeq forward solver, `anderson` or `fixed_point_iter`.
        max_iter: forward solver iterations at most.
        tol: forward relative residual at which the solver stops.
        gradient: `implicit` (implicit differentiation) or `phantom` (k unrolled steps at z*).
        phantom_steps: k of the phantom gradient.
        backward_max_iter: adjoint solver iterations at most (implicit gradient).
        backward_tol: adjoint relative residual at which it stops.
        use_input_layer: include the input layer (ablation: False).
        use_output_layer: include the output layer (ablation: False).
        prune: run the lottery-ticket stage.
        prune_fraction: ρ, the fraction of each weight tensor pruned.
        prune_scope: `per_tensor` or `global`.
        robust_strength: λ of the robust-training penalty (0 turns it off).
        robust_threshold_mode: `quantile` (t = the ρ-quantile of |w| per tensor, each step) or `absolute`.
        robust_threshold: t in `absolute` mode.
        robust_phases: `dense` (penalty before pruning only) or `both`.
        head_init: `torch` (project choice) or `vpt`.
    """

    category: ClassVar[str] = "prompt"
    identity_at_init: ClassVar[bool] = True
    # Its layers act on the image and on the pooled feature only, so any family serves (the paper has Swin rows).
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(
        default_factory=lambda: Recipe(
            optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100, warmup_epochs=10,
            lr_grid=(1e-4, 1e-3, 1e-2), wd_grid=(1e-4,),
        )
    )  # fmt: skip
    in_channels: int = 8
    in_groups: int = 4
    in_norm: str = "injection"
    out_dim: int = 64
    gamma: float = 0.9
    lipschitz: str = "operator"
    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-4
    gradient: str = "implicit"
    phantom_steps: int = 1
    backward_max_iter: int = 30
    backward_tol: float = 1e-6
    use_input_layer: bool = True
    use_output_layer: bool = True
    prune: bool = True
    prune_fraction: float = 0.5
    prune_scope: str = "per_tensor"
    robust_strength: float = 1e-4
    robust_threshold_mode: str = "quantile"
    robust_threshold: float = 1e-3
    robust_phases: str = "dense"
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "in_norm": ("injection", "sum", "none"), "lipschitz": ("operator", "kernel"),
            "solver": ("anderson", "fixed_point_iter"), "gradient": ("implicit", "phantom"),
            "prune_scope": ("per_tensor", "global"), "robust_threshold_mode": ("quantile", "absolute"),
            "robust_phases": ("dense", "both"), "head_init": HEAD_INITS,
        }  # fmt: skip
        self.check_choices(choices)
        _checks.integer(self, "in_channels", 1)
        _checks.integer(self, "in_groups", 1)
        _checks.divisor(self, "in_groups", self.in_channels, "in_channels")
        _checks.integer(self, "out_dim", 1)
        _checks.real(self, "gamma", 0.0, 1.0, low_open=True, high_open=True)  # a contraction
        _checks.integer(self, "max_iter", 1)
        _checks.real(self, "tol", 0.0, low_open=True)
        _checks.integer(self, "phantom_steps", 1)
        _checks.integer(self, "backward_max_iter", 1)
        _checks.real(self, "backward_tol", 0.0, low_open=True)
        _checks.real(self, "prune_fraction", 0.0, 1.0, high_open=True)
        _checks.real(self, "robust_strength", 0.0)
        _checks.real(self, "robust_threshold", 0.0)
        if not (self.use_input_layer or self.use_output_layer):
            raise ValueError(
                "LION needs at least one implicit layer; set use_input_layer=true or use_output_layer=true"
            )

    @classmethod
    def tiny(cls) -> Self:
        return cls(in_channels=4, in_groups=2, out_dim=8)

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return LIONModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        c, r, d = self.in_channels, self.out_dim, backbone.num_features
        gn = 2 * c if self.in_norm != "none" else 0
        input_layer = c * c * 9 + (3 * c * 9 + c) + gn + (c * 3 + 3)  # A, B, GN, O: 843 at c = 8
        output_layer = r * r + r * d + r + d * r  # W, U, b, V: 102,464 at r = 64, D = 768
        tunable = input_layer * self.use_input_layer + output_layer * self.use_output_layer
        return backbone_report(backbone, num_classes, tunable)

    # -- lottery ticket ---------------------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        return self.prune and self.prune_fraction > 0

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Any
    ) -> list[PruneCandidate]:
        if not isinstance(model, LIONModel):
            raise TypeError("LION pruning needs a LION model")
        weights = model.prunable_weights()
        masks = magnitude_masks(weights, self.prune_fraction, self.prune_scope)
        paths = {id(p): name for name, p in model.named_parameters()}
        state = {k: v.clone() for k, v in initial_state.items()}  # rewind everything, head included
        kept = {}
        for name, weight in weights.items():
            path = paths[id(weight)]
            mask_path = path.rsplit(".", 2)[0] + f".{path.rsplit('.', 2)[1]}_mask"
            state[mask_path] = masks[name]
            state[path] = initial_state[path] * masks[name]
            kept[name] = int(masks[name].sum())
        removed = sum(w.numel() for w in weights.values()) - sum(kept.values())
        info = {
            "fraction": self.prune_fraction, "scope": self.prune_scope, "kept": kept,
            "nonzero_tunable": sum(p.numel() for p in model.tunable_parameters()) - removed,
        }  # fmt: skip
        return [PruneCandidate(f"magnitude{round(100 * self.prune_fraction)}", state, info)]
