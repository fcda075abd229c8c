"""E²VPT's prompt modules (key-value prompts, prompt masks) and its model on timm's Swin.

On Swin, as ChengHan111/E2VPT `src/models/vit_prompt/swin_transformer_prompt_VK.py` (`PromptedSwinTransformer_Prompt_VK`):
VPT-deep's Swin flow (`methods/_swin_prompts.py`) plus, in every block's window attention, a key-value prompt
[heads, N_kv, head_dim] serving as both keys and values (the official code supports only a shared one on Swin),
prepended (its `LAYER_BEHIND=True` default) to the keys and values of every window with zero bias and mask
columns. The token and segment masks act on the input prompts only (the official code leaves the deep prompts
unmasked); pruning and rewinding then run as on ViT. Tunable: Σ depth_s·C_s·(P + N_kv) (12,032·(P + N_kv) on
Swin-B).
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from methods._base import TunableModule
from methods._swin import swin_blocks
from methods._swin_prompts import ExtraKV, PromptedSwin, swin_prompt_count


class KVPrompts(TunableModule):
    """One block's key-value prompts: `key` [heads, n, head_dim] (and `value` unless shared).

    Dropout (`dropout` > 0, in training) is drawn per sample on the batch-expanded tensor, separately for the
    keys and then the values (also when one tensor serves as both), as the official attention applies its
    module. The official runs never apply it (see `E2VPTConfig.kv_dropout_acts`); the model passes 0 then.
    """

    def __init__(self, heads: int, num_tokens: int, head_dim: int, *, share_kv: bool, init: str, dropout: float):
        super().__init__()
        self.key = nn.Parameter(torch.empty(heads, num_tokens, head_dim))
        self.value = None if share_kv else nn.Parameter(torch.empty(heads, num_tokens, head_dim))
        for p in (self.key, self.value):
            if p is None:
                continue
            if init == "kaiming":  # fan_in of [heads, n, head_dim] is n·head_dim: bound sqrt(6 / (n·head_dim))
                nn.init.kaiming_uniform_(p, a=0)
            elif init == "trunc_normal":
                nn.init.trunc_normal_(p, std=0.02)
            else:
                raise ValueError(f"kv_init must be `kaiming` or `trunc_normal`, got {init!r}")
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: int) -> tuple[Tensor, Tensor]:
        """(keys, values): [heads, n, head_dim] each, shared by the batch, or [batch, heads, n, head_dim] each
        when dropout acts."""
        value = self.key if self.value is None else self.value
        if not self.training or self.dropout.p == 0.0:
            return self.key, value
        return self.dropout(self.key.expand(batch, -1, -1, -1)), self.dropout(value.expand(batch, -1, -1, -1))


class PromptMasks(nn.Module):
    """Token mask [P] and segment mask [P, S], shared by every layer's visual prompt.

    Soft and trainable in the dense stage (initialised to 1); binary and frozen after pruning. Not a
    `TunableModule`: masks are never counted as tunable parameters.
    """

    def __init__(self, num_tokens: int, num_segments: int, dim: int, layout: str) -> None:
        super().__init__()
        if dim % num_segments:
            raise ValueError(f"embedding width {dim} is not divisible into {num_segments} segments")
        if layout not in ("strided", "contiguous"):
            raise ValueError(f"segment_layout must be `strided` or `contiguous`, got {layout!r}")
        self.token = nn.Parameter(torch.ones(num_tokens))
        self.segment = nn.Parameter(torch.ones(num_tokens, num_segments))
        self.dim, self.layout = dim, layout
        self.trainable = True

    def expanded(self) -> Tensor:
        """The combined mask [P, D]: strided, segment j covers dims j, j+S, j+2S, …; contiguous, a D/S block."""
        reps = self.dim // self.segment.shape[1]
        if self.layout == "strided":
            segment = self.segment.repeat(1, reps)
        else:
            segment = self.segment.repeat_interleave(reps, dim=1)
        return segment * self.token[:, None]

    def kept_tokens(self) -> Tensor:
        return self.token.detach().nonzero().flatten()

    def mask(self, prompt: Tensor, pruned_tokens: str) -> Tensor:
        """`prompt` [.., P, D] (after its dropout: the official order) times the masks; with `pruned_tokens="drop"`
        and fixed masks, the masked tokens removed."""
        prompt = prompt * self.expanded().to(prompt.dtype)
        if pruned_tokens == "drop" and not self.trainable:
            prompt = prompt[..., self.kept_tokens(), :]
        return prompt


class MaskedPrompts:
    """What E²VPT's models (ViT and Swin) share about their `masks` (a `PromptMasks`): trained as auxiliary parameters
    in the dense stage, saved with the tunable state, and fixed by a pruning decision."""

    masks: PromptMasks

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.masks.parameters()) if self.masks.trainable else []

    def state_modules(self) -> list[nn.Module]:
        return [self.masks]

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        self.masks.trainable = False
        self.load_tunable_state_dict(state, partial=True)
        self.mark_trainable()


class E2VPTSwinModel(MaskedPrompts, PromptedSwin):
    """E²VPT on Swin: masked input prompts, deep prompts per stage, shared key-value prompts in every block.

    `config` is an `E2VPTConfig` (its fields are read here; shared K=V is checked by the config).
    """

    def __init__(self, backbone: SwinTransformer, num_classes: int, config) -> None:
        super().__init__(backbone, num_classes, num_tokens=config.num_tokens, deep=True, dropout=config.dropout,
                         head_init=config.head_init, pool=config.pool, window_order=config.window_order)  # fmt: skip
        width = backbone.layers[0].blocks[0].dim
        self.masks = PromptMasks(config.num_tokens, config.num_segments, width, config.segment_layout)
        self.pruned_tokens = config.pruned_tokens
        kv_dropout = config.kv_dropout if config.kv_dropout_acts else 0.0  # the official code: never acts
        kv = [
            KVPrompts(b.attn.num_heads, n, _head_dim(b.attn), share_kv=True, init=config.kv_init, dropout=kv_dropout)
            for n in [config.num_kv_tokens]
            if n
            for _, _, b in swin_blocks(backbone)
        ]
        self.kv = nn.ModuleList(kv) if kv else None
        depths = [len(stage.blocks) for stage in backbone.layers]
        self._first_block = [sum(depths[:s]) for s in range(len(depths))]

    def input_prompts(self, batch: int) -> Tensor:
        return self.masks.mask(self.prompts.first(batch), self.pruned_tokens)

    def block_kv(self, stage: int, index: int) -> ExtraKV:
        return None if self.kv is None else self.kv[self._first_block[stage] + index]

    def nonzero_tunable(self) -> int:
        kept = int((self.masks.expanded().detach() != 0).sum())
        deep = sum(p.numel() for p in self.prompts.deep)
        kv = sum(p.numel() for p in self.kv.parameters()) if self.kv is not None else 0
        return kept + deep + kv


def _head_dim(attn: nn.Module) -> int:
    """A window attention's per-head width (its qkv projection's output is 3·heads·head_dim)."""
    return attn.qkv.out_features // (3 * attn.num_heads)


def swin_pruned_nonzero(swin: SwinTransformer, num_tokens: int, num_kv_tokens: int, num_segments: int, n_tok: int,
                        n_seg: int) -> int:  # fmt: skip
    """Surviving tunable weights on Swin: the masked input prompts (C0/S)·(P − n_tok)·(S − n_seg), every deep prompt
    and every key-value prompt."""
    width = swin.layers[0].blocks[0].dim
    visual = (width // num_segments) * (num_tokens - n_tok) * (num_segments - n_seg)
    deep = swin_prompt_count(swin, num_tokens, True) - num_tokens * width
    return visual + deep + swin_prompt_count(swin, num_kv_tokens, True)
