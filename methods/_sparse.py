"""Unstructured tuning of chosen entries of frozen tensors, shared by GPS and SPT.

- `SparseDelta`: the tuned entries of one frozen tensor: `index` (int64 flat positions into the tensor) and
  `values` (one delta per position, zero at init, so the tuned model starts at the frozen one); `add_to(tensor)`
  returns the tensor with the deltas added (the frozen tensor is never modified), `set_index` re-points it at
  other entries of the same count and restarts the values at zero (a pruning decision).
- `SparselyTuned`: a frozen `nn.Linear`, `nn.Conv2d` or `nn.LayerNorm` computed with `SparseDelta`s on its weight
  and/or bias (same call, same result at init); `folded()` gives the plain module with the deltas merged in.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._base import TunableModule

SPARSE_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm)


class SparseDelta(TunableModule):
    """Deltas on chosen entries of a frozen tensor: `index` (flat positions) and `values` (zero at init)."""

    def __init__(self, index: Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.int64).flatten().contiguous())
        self.values = nn.Parameter(torch.zeros(self.index.numel(), dtype=torch.float32, device=index.device))

    def add_to(self, tensor: Tensor) -> Tensor:
        """`tensor` with the values added at the selected entries (in its dtype); `tensor` is not modified."""
        return tensor.flatten().index_add(0, self.index, self.values.to(tensor.dtype)).view_as(tensor)

    def set_index(self, index: Tensor) -> None:
        """Select other entries (as many as now, flat positions); the values restart at zero."""
        if index.numel() != self.index.numel():
            raise ValueError(f"a new selection of {index.numel()} entries for a delta on {self.index.numel()}")
        with torch.no_grad():
            self.index.copy_(index.flatten())
            self.values.zero_()


class SparselyTuned(nn.Module):
    """A frozen `nn.Linear`, `nn.Conv2d` or `nn.LayerNorm` (`module`) whose weight and/or bias get the
    `SparseDelta`s `deltas["weight"]` / `deltas["bias"]` in the forward."""

    def __init__(self, module: nn.Linear | nn.Conv2d | nn.LayerNorm, deltas: dict[str, SparseDelta]) -> None:
        super().__init__()
        if not isinstance(module, SPARSE_LAYERS):
            raise TypeError(f"expected an nn.Linear, nn.Conv2d or nn.LayerNorm, got {type(module).__name__}")
        if not set(deltas) <= {"weight", "bias"}:
            raise ValueError(f"deltas go on `weight` and `bias`, got {sorted(deltas)}")
        self.module = module
        self.deltas = nn.ModuleDict(deltas)

    def tensor(self, attr: str) -> Tensor | None:
        """The frozen `weight` or `bias` with its delta added (the frozen one if it has none)."""
        base = getattr(self.module, attr)
        return self.deltas[attr].add_to(base) if attr in self.deltas else base

    def weight(self) -> Tensor:
        return self.tensor("weight")

    def forward(self, x: Tensor) -> Tensor:
        m, w, b = self.module, self.tensor("weight"), self.tensor("bias")
        if isinstance(m, nn.Linear):
            return F.linear(x, w, b)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        return m._conv_forward(x, w, b)

    def folded(self) -> nn.Module:
        """A copy of the frozen module with the deltas added to its tensors (in float64, then its dtype)."""
        module = copy.deepcopy(self.module)
        with torch.no_grad():
            for attr, delta in self.deltas.items():
                t = getattr(module, attr)
                t.copy_(t.double().flatten().index_add(0, delta.index, delta.values.double()).view_as(t).to(t.dtype))
        return module
