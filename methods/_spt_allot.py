"""SPT's decision stage: the candidate weights, their sensitivity and the allotment rule (see `methods/spt.py`).

- `Piece`, `candidate_pieces`: the candidates of a timm ViT in a fixed order (q, k, v as row blocks of the fused
  qkv, proj, fc1, fc2, their biases, the LayerNorm scales and shifts), one global index space over them;
- `sensitivity`: Σ g² of the cross-entropy loss for every candidate (the code's `get_sensitivity`);
- `module_cost`, `Allotter`, `Allotment`: the top-τ rule (a matrix holding at least cost/α of the selected weights
  gets its structured module, a vector holding at least len/β of them is tuned whole, the rest are unstructured
  entries), τ the largest within the budget;
- `default_allotment`: the deterministic decision of a model built without one, spending the budget exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

MATRICES = ("q", "k", "v", "proj", "fc1", "fc2")
SENSITIVITY_MODES = ("train", "eval")


@dataclass(frozen=True)
class Piece:
    """A candidate: a contiguous range of a backbone tensor (`path`.`attr`), flat offsets [start, start + numel).

    Matrices (`op` one of `MATRICES`) are rows [row0, row0 + out) of a Linear's weight with `in_features` columns;
    vectors (`op` None) are a bias (or its q/k/v third) or a LayerNorm's scale or shift.
    """

    path: str
    attr: str
    start: int
    numel: int
    op: str | None = None
    row0: int = 0
    out_features: int = 0
    in_features: int = 0


def candidate_pieces(vit: VisionTransformer) -> list[Piece]:
    """The candidates in a fixed order: per block norm1, q, k, v (weight, bias), proj, norm2, fc1, fc2, then the
    final norm (and `fc_norm`); absent biases and affine parameters are skipped."""
    pieces: list[Piece] = []

    def norm(path: str) -> None:
        m = vit.get_submodule(path)
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            pieces.extend(Piece(path, a, 0, m.weight.numel()) for a in ("weight", "bias") if getattr(m, a) is not None)

    def linear(path: str, ops: tuple[str, ...]) -> None:
        m = vit.get_submodule(path)
        rows = m.out_features // len(ops)
        for i, op in enumerate(ops):
            pieces.append(Piece(path, "weight", i * rows * m.in_features, rows * m.in_features, op, i * rows, rows,
                                m.in_features))  # fmt: skip
            if m.bias is not None:
                pieces.append(Piece(path, "bias", i * rows, rows))

    for i in range(len(vit.blocks)):
        norm(f"blocks.{i}.norm1")
        linear(f"blocks.{i}.attn.qkv", ("q", "k", "v"))
        linear(f"blocks.{i}.attn.proj", ("proj",))
        norm(f"blocks.{i}.norm2")
        linear(f"blocks.{i}.mlp.fc1", ("fc1",))
        linear(f"blocks.{i}.mlp.fc2", ("fc2",))
    for name in ("norm", "fc_norm"):
        if isinstance(getattr(vit, name, None), nn.LayerNorm):
            norm(name)
    return pieces


def module_cost(kind: str, rank: int, piece: Piece) -> int:
    """Parameters of the structured module of a matrix: LoRA r·(in + out), adapter 2·out·r + r + out (on its output,
    as the code's `get_structured_param_num`)."""
    if kind == "lora":
        return rank * (piece.in_features + piece.out_features)
    return 2 * piece.out_features * rank + rank + piece.out_features


@dataclass
class Allotment:
    """What the allotment rule decides for one τ: structured flags per matrix, unstructured/whole-vector entries."""

    top: int
    structured: Tensor  # bool [M], over the matrix pieces in order
    entries: Tensor  # int64, sorted global indices (whole vectors included)
    total: int  # tunable parameters: class token + structured costs + entries


class Allotter:
    """The allotment rule over `pieces` (global index space: the pieces concatenated in order)."""

    def __init__(self, pieces: list[Piece], costs: list[int | None], alpha: float, beta: float,
                 structured_vectors: bool, fixed: int) -> None:  # fmt: skip
        self.pieces = pieces
        self.sizes = torch.tensor([p.numel for p in pieces])
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.matrix = torch.tensor([p.op is not None for p in pieces])
        cost = torch.tensor([c if c is not None else 0 for c in costs], dtype=torch.float64)
        self.cost = cost.long()
        # A piece goes whole (module, or the whole vector) once it holds at least this many selected entries.
        self.whole_at = torch.where(self.matrix, cost / alpha, self.sizes.double() / beta)
        if not structured_vectors:
            self.whole_at = torch.where(self.matrix, self.whole_at, torch.full_like(self.whole_at, math.inf))
        self.whole_cost = torch.where(self.matrix, self.cost, self.sizes)
        self.fixed = fixed

    def counts(self, selected: Tensor) -> Tensor:
        """Selected entries per piece for global indices `selected`."""
        piece = torch.searchsorted(self.offsets, selected, right=True) - 1
        return torch.bincount(piece, minlength=len(self.pieces))

    def total(self, counts: Tensor) -> int:
        whole = counts.double() >= self.whole_at
        return self.fixed + int(torch.where(whole, self.whole_cost, counts).sum())

    def decide(self, selected: Tensor, top: int) -> Allotment:
        counts = self.counts(selected)
        whole = counts.double() >= self.whole_at
        piece = torch.searchsorted(self.offsets, selected, right=True) - 1
        keep = selected[~whole[piece]]  # entries of unstructured pieces
        vectors = [torch.arange(int(o), int(o + s)) for o, s, w, m in
                   zip(self.offsets, self.sizes, whole, self.matrix, strict=True) if w and not m]  # fmt: skip
        entries = torch.cat([keep, *vectors]).sort().values if vectors else keep.sort().values
        total = self.total(counts)
        return Allotment(top, whole[self.matrix].clone(), entries.long(), total)

    def maximum(self) -> int:
        """The total when every candidate is selected."""
        return self.total(self.sizes.clone())

    def allot(self, scores: Tensor, budget: int) -> Allotment:
        """The top-τ rule with the largest τ whose total stays within `budget` (the total grows with τ, so a
        bisection finds it); ranked on the scores' device, ties broken by candidate order."""
        order = torch.argsort(scores.detach(), descending=True, stable=True)
        ids = torch.arange(len(self.pieces), device=scores.device)
        ranked = torch.repeat_interleave(ids, self.sizes.to(scores.device))[order]

        def total(top: int) -> int:
            return self.total(torch.bincount(ranked[:top], minlength=len(self.pieces)).cpu())

        lo, hi = 0, len(order)  # total(lo) <= budget; the answer lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return self.decide(order[:lo].cpu(), lo)


def default_allotment(allotter: Allotter, budget: int) -> Allotment:
    """Deterministic decision spending exactly `budget`: modules on the eligible matrices in order while their cost
    fits, then the first entries of the other matrices and of the vectors (ValueError if it cannot be spent)."""
    remaining = budget - allotter.fixed
    pieces = allotter.pieces
    structured = torch.zeros(len(pieces), dtype=torch.bool)
    for i, p in enumerate(pieces):
        eligible = p.op is not None and p.numel >= allotter.whole_at[i]
        if eligible and int(allotter.cost[i]) <= remaining:
            structured[i] = True
            remaining -= int(allotter.cost[i])
    chunks = []
    for group in (True, False):  # unstructured entries: matrices first, then vectors
        for i, p in enumerate(pieces):
            if remaining == 0 or structured[i] or (p.op is not None) != group:
                continue
            k = min(remaining, p.numel)
            chunks.append(torch.arange(int(allotter.offsets[i]), int(allotter.offsets[i]) + k))
            remaining -= k
    if remaining:
        raise ValueError(f"the default decision cannot spend {budget} parameters ({remaining} left over)")
    entries = torch.cat(chunks).sort().values if chunks else torch.zeros(0, dtype=torch.long)
    return Allotment(-1, structured[allotter.matrix].clone(), entries, budget)


def sensitivity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], images: int | None, chunk: int,
                mode: str = "train") -> tuple[Tensor, int]:  # fmt: skip
    """Σ g² of the cross-entropy loss over chunks of `chunk` images (at most `images`; None: every batch) for
    every candidate, in the pieces' order (float32 [N] on the model's device), and the number of images used.

    `model` is an SPT model: its `pieces` and `frozen_tensor(piece)` (the frozen tensor a piece lies in)."""
    tensors = list({id(t): t for t in (model.frozen_tensor(p) for p in model.pieces)}.values())
    flags = [t.requires_grad for t in tensors]
    was_training = model.training
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    seen = 0
    try:
        model.train(mode == "train")
        for t in tensors:
            t.requires_grad_(True)
        for x, y in batches:
            for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
                if images is not None and seen >= images:
                    break
                loss = F.cross_entropy(model(xs), ys)
                for acc, g in zip(sums, torch.autograd.grad(loss, tensors), strict=True):
                    acc += g.float() ** 2
                seen += len(xs)
            if images is not None and seen >= images:
                break
    finally:
        for t, f in zip(tensors, flags, strict=True):
            t.requires_grad_(f)
        model.train(was_training)
    if seen == 0:
        raise ValueError("the sensitivity needs at least one training image")
    where = {id(t): acc for t, acc in zip(tensors, sums, strict=True)}
    flat = [where[id(model.frozen_tensor(p))].flatten()[p.start : p.start + p.numel] for p in model.pieces]
    return torch.cat(flat), seen
