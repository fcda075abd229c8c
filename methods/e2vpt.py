"""E²VPT: visual prompts and key-value prompts, with token and segment pruning and rewinding.

Han et al., "E²VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023,
https://arxiv.org/abs/2307.13770; official code ChengHan111/E2VPT (transfer type `P_VK`).

- Visual prompts: VPT-deep (P tokens per block, replaced before every block, U(-0.0625, 0.0625), dropout
  0.1 with a mask per sample), multiplied by a token mask [P] and a segment mask [P, 16] shared by all layers.
- Key-value prompts: per block a tensor [heads, N_kv, head_dim] prepended to the attention's keys and
  values (queries untouched), one tensor serving as both by default, kaiming-uniform init. Their dropout
  never acts, as in the official code (whose `train()` keeps the module in eval mode); `kv_dropout_acts`
  turns it on.
- Pruning, driven by the runner: a dense stage with trainable masks; importance = mean gradient of the
  loss w.r.t. each mask entry over train800 (signed, as the code; options `abs`, `taylor`); nested
  token and segment levels, lowest scores masked first; every (token level, segment level) pair is
  trained again from a fresh init with binary frozen masks and scored on val200 (ties: more masked
  tokens, then more masked segments); the final runs use the chosen masks.

Choices where the paper and code leave things open, each an option: segment layout `strided` (the
code tiles the [P, 16] mask along the feature axis, so segment j covers dims j, j+16, ...; or
`contiguous`); importance `signed`/`abs`/`taylor`; pruned tokens `zero` (the code keeps them as zero
vectors) or `drop` (removed from the sequence); rewinding `fresh` (a new random init, as the code) or
`initial` (the dense stage's initial values); fewer token or segment levels (`max_token_levels`,
`max_segment_levels`) for a smaller search, recorded in every result.

On Swin (`methods/_e2vpt_swin.py`): the official `swin_transformer_prompt_VK.py` flow, shared K=V only, masks on
the input prompts only; `pool` and `window_order` as VPT's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from methods import _checks
from methods._base import (
    HEAD_INITS,
    MethodConfig,
    ParamReport,
    PeftModel,
    PruneCandidate,
    Recipe,
)
from methods._e2vpt_swin import E2VPTSwinModel, KVPrompts, MaskedPrompts, PromptMasks, swin_pruned_nonzero
from methods._family import Backbone, backbone_report, family
from methods._inject import KVExtendedAttention
from methods._per_task import PerTaskSettings
from methods._registry import register_method
from methods._swin_prompts import POOLS, WINDOW_ORDERS, swin_prompt_count
from methods.vpt import VPT_DEFAULT_RECIPE, PromptedViT, vpt_recipe, vpt_task_recipe

# Pre-pruning (P, N_kv) per task, from the official `command.txt` ("Documented Version").
E2VPT_TOKENS = {
    "cifar100": (5, 5), "caltech101": (32, 5), "dtd": (10, 5), "flowers102": (1, 1), "pets": (10, 5),
    "svhn": (10, 5), "sun397": (10, 5), "camelyon": (10, 10), "eurosat": (10, 5), "resisc45": (10, 5),
    "retinopathy": (10, 5), "clevr_count": (10, 5), "clevr_dist": (10, 5), "dmlab": (10, 5), "kitti": (10, 5),
    "dsprites_loc": (5, 5), "dsprites_ori": (5, 5), "smallnorb_azi": (10, 5), "smallnorb_ele": (10, 5),
}  # fmt: skip
LEVEL_PERCENTS = range(10, 100, 10)


def token_levels(num_tokens: int, min_kept: int = 1) -> list[int]:
    """Masked-token counts: distinct min(⌊P·q/100⌋, P − min_kept) for q = 10, 20, …, 90."""
    return sorted({min(num_tokens * q // 100, num_tokens - min_kept) for q in LEVEL_PERCENTS})


def segment_levels(num_segments: int = 16, min_kept: int = 4) -> list[int]:
    """Masked-segment counts per token: distinct min(⌊S·q/100⌋, S − min_kept); {1, 3, 4, 6, 8, 9, 11, 12} for 16."""
    return sorted({min(num_segments * q // 100, num_segments - min_kept) for q in LEVEL_PERCENTS})


def _subsample(levels: list[int], k: int | None) -> list[int]:
    """At most `k` levels, evenly spread over `levels` (ends included)."""
    if k is None or k >= len(levels):
        return levels
    if k == 1:
        return [levels[len(levels) // 2]]
    return sorted({levels[round(i * (len(levels) - 1) / (k - 1))] for i in range(k)})


class E2VPTModel(MaskedPrompts, PromptedViT):
    """VPT-deep with masked visual prompts and key-value prompts in every block's attention."""

    def __init__(
        self, backbone: VisionTransformer, num_classes: int, config: E2VPTConfig,
    ) -> None:  # fmt: skip
        super().__init__(backbone, num_classes, num_tokens=config.num_tokens, deep=True, dropout=config.dropout,
                         head_init=config.head_init, pool=config.pool)  # fmt: skip
        self.masks = PromptMasks(config.num_tokens, config.num_segments, backbone.embed_dim, config.segment_layout)
        self.pruned_tokens = config.pruned_tokens
        self.num_kv_tokens = config.num_kv_tokens
        kv_dropout = config.kv_dropout if config.kv_dropout_acts else 0.0  # the official code: never acts
        for block in backbone.blocks if config.num_kv_tokens else ():
            attn = block.attn
            kv = KVPrompts(attn.num_heads, config.num_kv_tokens, attn.head_dim, share_kv=config.share_kv,
                           init=config.kv_init, dropout=kv_dropout)  # fmt: skip
            block.attn = KVExtendedAttention(attn, kv)

    def layer_prompt(self, layer: int, batch: int) -> Tensor:
        return self.masks.mask(self.prompts(layer, batch), self.pruned_tokens)

    def nonzero_tunable(self) -> int:
        kept = int((self.masks.expanded().detach() != 0).sum())
        kv = sum(p.numel() for m in self.modules() if isinstance(m, KVPrompts) for p in m.parameters())
        return kept * self.prompts.prompts.shape[0] + kv


@torch.enable_grad()
def importance_scores(
    model: E2VPTModel | E2VPTSwinModel, batches: Iterable[tuple[Tensor, Tensor]], mode: str
) -> tuple[Tensor, Tensor]:
    """Mean over batches of a per-entry score of the token mask [P] and segment mask [P, S].

    `signed`: ∂L/∂m (the official code); `abs`: |∂L/∂m|; `taylor`: −m·∂L/∂m, the first-order loss change
    of setting m to 0. Computed in eval mode with `torch.autograd.grad`: no parameter or `.grad` changes.
    """
    masks = model.masks
    was_training = model.training
    model.eval()
    total_token, total_segment, n = torch.zeros_like(masks.token), torch.zeros_like(masks.segment), 0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        g_token, g_segment = torch.autograd.grad(loss, [masks.token, masks.segment])
        if mode == "signed":
            total_token += g_token
            total_segment += g_segment
        elif mode == "abs":
            total_token += g_token.abs()
            total_segment += g_segment.abs()
        elif mode == "taylor":
            total_token -= masks.token.detach() * g_token
            total_segment -= masks.segment.detach() * g_segment
        else:
            raise ValueError(f"importance must be `signed`, `abs` or `taylor`, got {mode!r}")
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("importance needs at least one batch")
    return total_token / n, total_segment / n


def nested_masks(token_scores: Tensor, segment_scores: Tensor, n_tok: int, n_seg: int) -> tuple[Tensor, Tensor]:
    """Binary masks with the `n_tok` lowest-score tokens and, within every token, the `n_seg` lowest segments off."""
    token = torch.ones_like(token_scores)
    token[torch.argsort(token_scores, stable=True)[:n_tok]] = 0.0
    segment = torch.ones_like(segment_scores)
    lowest = torch.argsort(segment_scores, dim=1, stable=True)[:, :n_seg]
    segment.scatter_(1, lowest, 0.0)
    return token, segment


@register_method("e2vpt")
@dataclass
class E2VPTConfig(PerTaskSettings, MethodConfig):
    """E²VPT settings (defaults: the official code's documented commands).

    Attributes:
        num_tokens: visual prompt length P (per task from the spec in `for_task`).
        num_kv_tokens: key-value prompt length N_kv (per task from the spec in `for_task`).
        dropout: visual prompt dropout (a mask per sample, drawn as the official code draws it).
        kv_dropout: key-value prompt dropout; acts only with `kv_dropout_acts`.
        kv_dropout_acts: False (the official behaviour): the key-value dropout never acts, whatever its rate,
            since the official module sits in the encoder that the prompted model's `train()` keeps in eval
            mode. True: it acts in training, a mask per sample, drawn separately for keys and values.
        share_kv: one tensor serves as key and value prompt (otherwise two, 2× parameters).
        kv_init: `kaiming` (kaiming-uniform, the code's `ORIGIN_INIT=2`) or `trunc_normal` (std 0.02).
        num_segments: segments per prompt token.
        segment_layout: `strided` (the code) or `contiguous`.
        prune: run the pruning pipeline; False is the paper's no-pruning variant.
        importance: `signed` (the code), `abs` or `taylor`.
        pruned_tokens: `zero` (kept in the sequence as zero vectors, the code) or `drop`.
        rewind_init: `fresh` (new random init, the code) or `initial` (the dense stage's initial values).
        min_kept_tokens: the token levels never mask more than P minus this.
        min_kept_segments: the segment levels never mask more than S minus this.
        max_token_levels: search at most this many token levels (evenly spread); None: all.
        max_segment_levels: search at most this many segment levels; None: all.
        head_init: `vpt` or `torch`.
        per_task: apply the per-task P, N_kv and recipe in `for_task`.
        pool: `all` (prompts averaged with the other tokens where the backbone averages tokens) or `image`.
        window_order: Swin only: `official` or `per_sample` (as VPT's, `methods/_swin_prompts.py`).
    """

    category: ClassVar[str] = "prompt"
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=lambda: vpt_recipe(*VPT_DEFAULT_RECIPE))
    num_tokens: int = 10
    num_kv_tokens: int = 5
    dropout: float = 0.1
    kv_dropout: float = 0.0
    kv_dropout_acts: bool = False
    share_kv: bool = True
    kv_init: str = "kaiming"
    num_segments: int = 16
    segment_layout: str = "strided"
    prune: bool = True
    importance: str = "signed"
    pruned_tokens: str = "zero"
    rewind_init: str = "fresh"
    min_kept_tokens: int = 1
    min_kept_segments: int = 4
    max_token_levels: int | None = None
    max_segment_levels: int | None = None
    head_init: str = "vpt"
    per_task: bool = True
    pool: str = "all"
    window_order: str = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "importance": ("signed", "abs", "taylor"), "pruned_tokens": ("zero", "drop"),
            "rewind_init": ("fresh", "initial"), "segment_layout": ("strided", "contiguous"),
            "kv_init": ("kaiming", "trunc_normal"), "head_init": HEAD_INITS, "pool": POOLS,
            "window_order": WINDOW_ORDERS,
        }  # fmt: skip
        self.check_choices(choices)
        _checks.integer(self, "num_tokens", 1)
        _checks.integer(self, "num_kv_tokens", 0)
        _checks.rates(self, "dropout", "kv_dropout")
        _checks.integer(self, "num_segments", 1)
        # The levels mask at most P − min_kept_tokens tokens and S − min_kept_segments segments per token.
        _checks.integer(self, "min_kept_tokens", 0, self.num_tokens, high_is="num_tokens")
        _checks.integer(self, "min_kept_segments", 0, self.num_segments, high_is="num_segments")
        _checks.integer(self, "max_token_levels", 1, none_ok=True)
        _checks.integer(self, "max_segment_levels", 1, none_ok=True)

    def check_backbone(self, backbone: Backbone) -> None:
        if family(backbone) == "swin":
            _checks.divisor(self, "num_segments", backbone.layers[0].blocks[0].dim, "the Swin stage-0 width")
            if not self.share_kv:
                raise _checks.invalid(self, "share_kv", "is not supported on Swin (the official code shares K=V)")
            if not all(isinstance(s.blocks[0].attn, WindowAttention) for s in backbone.layers):
                raise ValueError("e2vpt needs timm's WindowAttention in every Swin block")
            return
        _checks.divisor(self, "num_segments", backbone.embed_dim, "the backbone's width")
        if self.num_kv_tokens and not all(isinstance(b.attn, Attention) for b in backbone.blocks):
            raise _checks.invalid(self, "num_kv_tokens", "needs timm's Attention in every block", 0)

    def task_values(self, task_id: str) -> dict[str, Any]:
        p, n_kv = E2VPT_TOKENS.get(task_id, (self.num_tokens, self.num_kv_tokens))
        return {"num_tokens": p, "num_kv_tokens": n_kv, "recipe": vpt_task_recipe(task_id)}

    @classmethod
    def tiny(cls) -> Self:
        return cls(num_tokens=4, num_kv_tokens=2)

    def create(self, backbone: Backbone, num_classes: int) -> PeftModel:
        if isinstance(backbone, SwinTransformer):
            return E2VPTSwinModel(backbone, num_classes, self)
        return E2VPTModel(backbone, num_classes, self)

    def expected_params(self, backbone: Backbone, num_classes: int) -> ParamReport:
        if family(backbone) == "swin":  # 12,032·(P + N_kv) on Swin-B (K=V shared)
            tunable = swin_prompt_count(backbone, self.num_tokens + self.num_kv_tokens, True)
            return backbone_report(backbone, num_classes, tunable)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        # 9,216·(P + N_kv) on ViT-B/16 with shared K=V (heads·head_dim = D per KV token and layer).
        tunable = depth * dim * (self.num_tokens + self.num_kv_tokens * (1 if self.share_kv else 2))
        return backbone_report(backbone, num_classes, tunable)

    def pruned_nonzero(self, backbone: Backbone, n_tok: int, n_seg: int) -> int:
        """Surviving tunable weights: depth·(D/S)·(P − n_tok)·(S − n_seg) + the KV prompts (576·… on ViT-B/16); on
        Swin only the input prompts are masked (`swin_pruned_nonzero`)."""
        if family(backbone) == "swin":
            return swin_pruned_nonzero(backbone, self.num_tokens, self.num_kv_tokens, self.num_segments, n_tok, n_seg)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        visual = depth * (dim // self.num_segments) * (self.num_tokens - n_tok) * (self.num_segments - n_seg)
        return visual + depth * dim * self.num_kv_tokens * (1 if self.share_kv else 2)

    # -- pruning ---------------------------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        return self.prune

    def levels(self) -> tuple[list[int], list[int]]:
        """The searched token and segment levels (after any budget reduction)."""
        tokens = _subsample(token_levels(self.num_tokens, self.min_kept_tokens), self.max_token_levels)
        segments = _subsample(segment_levels(self.num_segments, self.min_kept_segments), self.max_segment_levels)
        return tokens, segments

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        if not isinstance(model, E2VPTModel | E2VPTSwinModel):
            raise TypeError("E2VPT pruning needs an E2VPT model")
        token_scores, segment_scores = importance_scores(model, batches, self.importance)
        rewind = {k: v for k, v in initial_state.items() if not k.startswith("masks.")}
        tokens, segments = self.levels()
        candidates = []
        for n_tok in tokens:
            for n_seg in segments:
                token, segment = nested_masks(token_scores, segment_scores, n_tok, n_seg)
                state = {"masks.token": token, "masks.segment": segment}
                if self.rewind_init == "initial":
                    state.update(rewind)
                info: dict[str, Any] = {
                    "masked_tokens": n_tok, "masked_segments": n_seg,
                    "pruned_token_ids": sorted(int(i) for i in (token == 0).nonzero().flatten()),
                    "nonzero_tunable": self.pruned_nonzero(model.backbone, n_tok, n_seg),
                    "token_levels": tokens, "segment_levels": segments,
                    "token_scores": [round(float(s), 8) for s in token_scores],
                }  # fmt: skip
                candidates.append(PruneCandidate(f"tok{n_tok}-seg{n_seg}", state, info, (n_tok, n_seg)))
        return candidates
