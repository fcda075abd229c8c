"""SCT: salient channel tuning, a K×K linear map on the K most salient channels of every block.

Zhao, Wang, Zhao, Luo, Wang and Shou, "SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient
Channels", IJCV 2023, https://arxiv.org/abs/2309.08513. Official code read: showlab/SCT 384cecb (identical
to zhaohengyuan1/SCT 01e8f1e in `train_model_sct.py` and `models/vision_transformer_sct.py`), and V-PETL Bench
(synbol/Parameter-Efficient-Transfer-Learning-Benchmark c188fad, the same selection code and model).

- Selection (the code's `getSalientChannels`, the paper's class-aware importance score): the plain pretrained
  ViT (no SCT module, drop-path off, eval mode) is run over the task's training images; at each block the
  tensor the module will act on is hooked, its prefix tokens (CLS) dropped; for every class c and channel j,
  s_cj = the L2 norm of channel j over all tokens of all images of class c; the score of channel j is the mean
  of s_cj over the classes present; the K channels of highest score are kept (the code's `> sorted[D−1−K]`,
  which is the top K when no score ties; here ties go to the lower channel index), stored in ascending order.
  In the suite the decision is made once per task, before the grid, from train800 (`decides_from =
  "pretrained"`); the official code scores train800val200 (its final training split), batch 50, no augmentation.
- Module (`ChannelAdapter`, the code's): x[..., idx] ← x[..., idx] + W x[..., idx] + b with W [K, K], b [K];
  every other channel passes unchanged. Init: W truncated normal std 0.02, b 0 (the code's), so the model is
  not the frozen backbone at init (`adapter_init=zero` makes it so). The code's `scale`/`scaleonx` per-task
  config values are read but unused (the lines using them are commented out), so there is no scale here.
- Placement (`placement`, the code's `tuning_mode`): `attn` (default: `sct_attn`, the mode of the official VTAB
  script): on the residual stream after the attention sub-block, before `norm2` and the MLP residual (so the MLP
  and the residual both see the adapted channels), scored on `norm2`'s input; `mlp` (`sct_mlp`): on the MLP's
  output before layer-scale and drop-path, scored, as the code does, on the block's output; `qkv` (`sct_qkv`):
  two modules on the qkv projection's output, K of the D query channels and K of the D value channels, each
  scored on its own part of that output (2× the parameters).
- A model built without the decision (the contract tests) uses the first K channels of every site.

Recipe (the official `run_model_sct.sh`, K=96, `sct_attn`): AdamW on the tunable tensors and the head, all
decayed, lr and weight decay per task (`SCT_TASKS`; default lr 1e-3, wd 1e-4, the script's argparse defaults;
V-PETL Bench's copy of the script changes a few of them, e.g. cifar100 0.012/0.6, pets 0.0005/0.3: not used),
batch 64 with drop_last, 100 epochs, timm's `CosineLRScheduler` (warm-up 10 epochs from 1e-6, floor 1e-5) stepped
per epoch, drop-path 0.1, head PyTorch's default init. Not reproduced (the suite's recipe has no such settings):
label smoothing 0.1 on the natural and specialized tasks and kitti, and RandAugment/color-jitter training
augmentation on the 11 tasks whose config sets `train_aug` (dtd, pets, svhn, camelyon, eurosat, resisc45,
retinopathy, clevr_count, clevr_dist, dmlab, kitti). The official trainer keeps the best of its test evaluations
(every 10 epochs); the suite reports the last epoch. The grid for the suite's `grid` protocol is the suite's choice
(the per-task values have no published search): lr {1e-3, 1e-2, 5e-2} × weight decay {1e-3, 1e-1}, spanning
the official per-task values.

Parameters: sites·depth·(K² + K); 12·(96² + 96) = 111,744 on ViT-B/16 (`attn` or `mlp`), 223,488 with `qkv`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, PruneCandidate, Recipe, TunableModule
from methods._family import backbone_report
from methods._inject import Wrapped, replace_module
from methods._per_task import PerTaskSettings
from methods._petl_recipe import petl_recipe
from methods._registry import register_method

PLACEMENTS = ("attn", "mlp", "qkv")
ADAPTER_INITS = ("trunc_normal", "zero")
# The sites of one block per placement: the adapted tensor's channel groups (qkv: the query and value parts).
SITES = {"attn": ("attn",), "mlp": ("mlp",), "qkv": ("q", "v")}
# (lr, weight decay) per task, from the official `run_model_sct.sh` (showlab/SCT; ViT-B/16, K = 96, sct_attn).
SCT_TASKS = {
    "cifar100": (0.013, 1.0), "caltech101": (0.006, 0.35), "dtd": (0.0032, 0.04), "flowers102": (0.05, 0.11),
    "pets": (0.0007, 0.8), "svhn": (0.075, 0.03), "sun397": (0.0017, 0.01), "camelyon": (0.0072, 0.002),
    "eurosat": (0.06, 0.001), "resisc45": (0.01, 0.01), "retinopathy": (0.004, 0.0003), "clevr_count": (0.0033, 0.01),
    "clevr_dist": (0.0018, 0.005), "dmlab": (0.009, 0.1), "kitti": (0.0072, 0.0001), "dsprites_loc": (0.003, 0.001),
    "dsprites_ori": (0.01, 0.05), "smallnorb_azi": (0.0062, 0.005), "smallnorb_ele": (0.0011, 0.0005),
}  # fmt: skip
SCT_LR_GRID = (1e-3, 1e-2, 5e-2)
SCT_WD_GRID = (1e-3, 1e-1)


def sct_recipe(lr: float = 1e-3, weight_decay: float = 1e-4) -> Recipe:
    """The official trainer's recipe (the shared AdamW pattern of `petl_recipe`) with SCT's grid."""
    return petl_recipe(lr=lr, weight_decay=weight_decay, lr_grid=SCT_LR_GRID, wd_grid=SCT_WD_GRID)


class ChannelAdapter(TunableModule):
    """x[..., idx] += W x[..., idx] + b on K selected channels of a tensor [.., width]; the others pass unchanged.

    `index` (a persistent buffer, so checkpoints carry the selection) holds the channels, offset by `offset`
    within the adapted tensor (the value part of a qkv output starts at 2D). `enabled` off makes it the identity
    (used while scoring channels on the frozen backbone).
    """

    def __init__(self, k: int, width: int, *, offset: int = 0, init: str = "trunc_normal") -> None:
        super().__init__()
        self.width, self.offset, self.enabled = width, offset, True
        self.linear = nn.Linear(k, k)
        if init == "trunc_normal":  # the official init: timm's trunc_normal_(std=.02), bias 0
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
        else:
            nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("index", torch.arange(k) + offset)

    def channels(self) -> Tensor:
        """The selected channels, within this site's `width` channels."""
        return self.index - self.offset

    def set_channels(self, channels: Tensor) -> None:
        self.index.copy_(channels.to(self.index) + self.offset)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        update = self.linear(x.index_select(-1, self.index))
        return x.index_add(-1, self.index, update.to(x.dtype))


class ChannelTunedBlock(nn.Module):
    """A timm ViT `Block` with a module on the residual stream between its attention and MLP sub-blocks
    (`sct_attn`): the block's own norms, attention, MLP, layer-scales and drop-paths do the work; the two
    residual sums are written here because timm's `Block.forward` has no place between them."""

    def __init__(self, block: nn.Module, adapter: ChannelAdapter) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.adapter(x)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


@dataclass
class _Site:
    """One adapted tensor: its key in a decision's state, its module, and where to hook the tensor scored for it
    (`module`'s input or output, the columns `start:start + width` of it)."""

    key: str
    adapter: ChannelAdapter
    module: nn.Module
    reads: str
    start: int
    width: int


class SCTModel(PeftModel):
    """A frozen ViT with a `ChannelAdapter` at every block's `placement` site(s)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: SCTConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.k = config.k
        self.placement = config.placement
        dim, k, init = backbone.embed_dim, config.k, config.adapter_init
        sites: list[_Site] = []
        blocks = list(backbone.blocks)
        for i, block in enumerate(blocks):
            if config.placement == "attn":
                adapter = ChannelAdapter(k, dim, init=init)
                blocks[i] = ChannelTunedBlock(block, adapter)
                sites.append(_Site(f"blocks.{i}.attn", adapter, block.norm2, "input", 0, dim))
            elif config.placement == "mlp":
                adapter = ChannelAdapter(k, dim, init=init)
                replace_module(block, "mlp", Wrapped(block.mlp, after=adapter))
                sites.append(_Site(f"blocks.{i}.mlp", adapter, block, "output", 0, dim))  # the code scores here
            else:
                q = ChannelAdapter(k, dim, init=init)
                v = ChannelAdapter(k, dim, offset=2 * dim, init=init)
                qkv = block.attn.qkv
                replace_module(block, "attn.qkv", Wrapped(qkv, after=nn.Sequential(q, v)))
                sites += [_Site(f"blocks.{i}.q", q, qkv, "output", 0, dim),
                          _Site(f"blocks.{i}.v", v, qkv, "output", 2 * dim, dim)]  # fmt: skip
        if config.placement == "attn":
            backbone.blocks = nn.Sequential(*blocks)
        self._sites = sites  # a plain list: the modules are registered once, where they sit in the backbone

    def site_keys(self) -> list[str]:
        return [s.key for s in self._sites]

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return []  # the official AdamW decays every trainable tensor, biases and head included

    def channels(self) -> dict[str, Tensor]:
        """The selected channels of every site (int64 [K], within the site's width)."""
        return {s.key: s.adapter.channels().detach().cpu() for s in self._sites}

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        """Set every site's channels from a decision's state (site key -> int64 [K] channel indices)."""
        missing, unexpected = (
            sorted(set(self.site_keys()) - state.keys()),
            sorted(state.keys() - set(self.site_keys())),
        )
        if missing or unexpected:
            raise ValueError(f"SCT channel state does not match the model: missing {missing}, unexpected {unexpected}")
        for site in self._sites:
            channels = state[site.key]
            if channels.dtype != torch.int64 or channels.shape != (self.k,):
                raise ValueError(f"{site.key}: expected int64 [{self.k}] channels, got {channels.dtype} "
                                 f"{tuple(channels.shape)}")  # fmt: skip
            if channels.unique().numel() != self.k or channels.min() < 0 or channels.max() >= site.width:
                raise ValueError(f"{site.key}: channels must be {self.k} distinct indices in [0, {site.width})")
            with torch.no_grad():
                site.adapter.set_channels(channels)

    @torch.no_grad()
    def channel_scores(self, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, int]]:
        """The class-aware score of every channel of every site (float64 [width]) on the frozen backbone (the SCT
        modules off, eval mode), and the number of images and classes it was computed from."""
        num_classes, prefix = self.head.out_features, self.backbone.num_prefix_tokens
        sums: dict[str, Tensor] = {}  # site key -> per-class sum of squares [classes, width]
        labels: list[Tensor] = []

        def accumulate(site: _Site) -> Callable[[Tensor], None]:
            def add(t: Tensor) -> None:
                part = t[:, prefix:, site.start : site.start + site.width]
                dtype = torch.float64 if part.device.type in ("cpu", "cuda") else torch.float32
                per_image = part.to(dtype).square().sum(dim=1)  # [B, width]
                if site.key not in sums:
                    sums[site.key] = per_image.new_zeros(num_classes, site.width)
                sums[site.key].index_add_(0, labels[-1].to(per_image.device), per_image)

            return add

        hooks = []
        for site in self._sites:
            add = accumulate(site)
            if site.reads == "input":
                hooks.append(site.module.register_forward_pre_hook(lambda m, args, add=add: add(args[0])))
            else:
                hooks.append(site.module.register_forward_hook(lambda m, args, out, add=add: add(out)))
        was_training = self.training
        self.eval()
        for site in self._sites:
            site.adapter.enabled = False
        try:
            for x, y in batches:
                labels.append(y.long())
                self.backbone.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
            for site in self._sites:
                site.adapter.enabled = True
            self.train(was_training)
        if not labels:
            raise ValueError("scoring channels needs at least one batch")
        all_labels = torch.cat([y.cpu() for y in labels])
        present = all_labels.unique()
        scores = {key: s[present.to(s.device)].sqrt().mean(dim=0).cpu() for key, s in sums.items()}
        return scores, {"images": int(all_labels.numel()), "classes": int(present.numel())}


def top_channels(scores: Tensor, k: int) -> Tensor:
    """The `k` highest-scoring channels (ties: the lower index), in ascending order (int64 [k])."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values.to(torch.int64)


def channels_digest(state: dict[str, Tensor]) -> str:
    """A short hash of a selection (site keys and channels), for result records."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + b":" + ",".join(str(int(i)) for i in state[key]).encode() + b";")
    return h.hexdigest()[:16]


@register_method("sct")
@dataclass
class SCTConfig(PerTaskSettings, MethodConfig):
    """SCT settings (defaults: the official VTAB script, `sct_attn` with K = 96).

    Attributes:
        k: channels tuned per site (the code's `topN`).
        placement: `attn` (the code's `sct_attn`, default), `mlp` (`sct_mlp`) or `qkv` (`sct_qkv`).
        adapter_init: `trunc_normal` (std 0.02, the code's) or `zero` (identity at init).
        drop_path_rate: the backbone's stochastic depth (the script's `--dpr 0.1`).
        head_init: `torch` (PyTorch's default, as the code's `reset_classifier`) or `vpt`.
        per_task: apply the per-task lr and weight decay of the official script in `for_task`.
    """

    category: ClassVar[str] = "selection"
    decides_from: ClassVar[str] = "pretrained"
    needs: ClassVar[str] = "a ViT's blocks with norm2, MLP and a fused qkv Linear (timm's VisionTransformer)"

    recipe: Recipe = field(default_factory=sct_recipe)
    k: int = 96
    placement: str = "attn"
    adapter_init: str = "trunc_normal"
    drop_path_rate: float = 0.1
    head_init: str = "torch"
    per_task: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.integer(self, "k", 1)
        self.check_choices({"placement": PLACEMENTS, "adapter_init": ADAPTER_INITS, "head_init": HEAD_INITS})
        _checks.rates(self, "drop_path_rate")

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.adapter_init == "zero"

    @property
    def prunes(self) -> bool:
        return True

    @classmethod
    def tiny(cls) -> Self:
        return cls(k=8)

    def check_backbone(self, backbone: VisionTransformer) -> None:
        dim = backbone.embed_dim
        if self.k > dim:
            raise _checks.invalid(self, "k", f"exceeds the backbone's width {dim}", dim)
        parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        odd = next((type(b).__name__ for b in backbone.blocks if not all(hasattr(b, n) for n in parts)), None)
        if odd is not None:
            raise ValueError(f"sct needs timm's ViT blocks (norms, attention, MLP, drop-paths); this backbone has "
                             f"{odd}: pick a plain timm ViT")  # fmt: skip
        qkv = [getattr(b.attn, "qkv", None) for b in backbone.blocks]
        if self.placement == "qkv" and not all(isinstance(q, nn.Linear) and q.out_features == 3 * dim for q in qkv):
            raise _checks.invalid(self, "placement", "needs a fused qkv Linear in every block", "attn")

    def task_values(self, task_id: str) -> dict[str, Any]:
        if task_id not in SCT_TASKS:
            return {}
        return {"recipe": sct_recipe(*SCT_TASKS[task_id])}

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return SCTModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        # 12·(96² + 96) = 111,744 on ViT-B/16 (one site per block; qkv has two)
        tunable = len(backbone.blocks) * len(SITES[self.placement]) * (self.k * self.k + self.k)
        return backbone_report(backbone, num_classes, tunable)

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        """One candidate: the top-K channels of every site, scored on the freshly built model's frozen backbone."""
        if not isinstance(model, SCTModel):
            raise TypeError("SCT channel selection needs an SCT model")
        scores, seen = model.channel_scores(batches)
        state = {key: top_channels(scores[key], self.k) for key in model.site_keys()}
        info = {
            "k": self.k, "placement": self.placement, "sites": len(state), **seen,
            "nonzero_tunable": model.param_report().tunable, "channels_sha256": channels_digest(state),
        }  # fmt: skip
        return [PruneCandidate(f"top{self.k}", state, info)]
