"""The bottleneck adapter shared by Adapter (NOAH, Houlsby) and AdaptFormer: up(dropout(act(down(x)))).

Linear(D → h) with bias, an activation, dropout, Linear(h → D) with bias. Two initialisations occur in
the code bases the specs read:
- `xavier`: both weights xavier-uniform, both biases N(0, 1e-6²), as NOAH's and PETL_Vision's adapters
  declare it (their ViTs then re-initialise every Linear: `methods/_timm_init.py`, the adapters' `init`):
  the up-projection is not zero, so the adapter does not start as the identity;
- `lora`: down weight kaiming-uniform(a=√5) (PyTorch's Linear default), up weight and both biases zero
  (AdaptFormer's official code): the branch starts at exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._base import TunableModule

BOTTLENECK_INITS = ("xavier", "lora")


class Bottleneck(TunableModule):
    """x [.., D] -> up(dropout(act(down(x)))) [.., D], split into `hidden` and `project` so that a caller
    (`ParallelBranches`) can fold a scale and a drop-path mask into the narrow side."""

    def __init__(self, dim: int, hidden_dim: int, *, act: nn.Module, dropout: float, init: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden_dim, dim)
        if init == "xavier":
            for linear in (self.down, self.up):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        elif init == "lora":  # down keeps nn.Linear's kaiming-uniform(a=√5) weight
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            raise ValueError(f"init must be one of {BOTTLENECK_INITS}, got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """[.., D] -> the bottleneck after activation and dropout [.., h]."""
        return self.dropout(self.act(self.down(x)))

    def project(self, z: Tensor, factor: Tensor | float = 1.0) -> Tensor:
        """factor · up(z) for a float or a per-sample [B, 1, 1] factor, applied on the narrow side (for a
        tensor factor the bias becomes one more input column (z, 1) · [W, b]ᵀ, as Convpass does)."""
        if isinstance(factor, float):
            if factor == 1.0:
                return self.up(z)
            return F.linear(z * factor, self.up.weight, self.up.bias * factor)
        z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1) * factor
        return F.linear(z, torch.cat([self.up.weight, self.up.bias[:, None]], dim=1))


class ResidualBottleneck(Bottleneck):
    """A sequential adapter: x + scale · bottleneck(x)."""

    def __init__(self, dim: int, hidden_dim: int, *, act: nn.Module, dropout: float, init: str, scale: float):
        super().__init__(dim, hidden_dim, act=act, dropout=dropout, init=init)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.hidden(x), float(self.scale))
