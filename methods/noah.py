"""NOAH: a supernet of VPT-deep prompts, LoRA and an adapter in every block, an evolutionary search, a retrained subnet.

Zhang, Zhou, Liu, "Neural Prompt Search", arXiv 2022 (TPAMI 2024), https://arxiv.org/abs/2206.04673. Code read:
ZhangYuanhan-AI/NOAH e9c55f3 (`model/`, `supernet_*_prompt.py`, `evolution.py`, `experiments/NOAH/`, `configs/NOAH/`).

Modules, in every block i (each of width D, "dim" below is its own width in block i, 0 = absent):
- prompts (VPT-deep, the code's): p_i tokens appended at the END of the sequence before block i, replacing the
  previous block's prompt tokens; a block without prompts keeps those it receives; dropout 0.1 on the tokens; xavier
  init with the bound of the code's allocated [1, 100, D] tensor (`supernet_rows`); removed before pooling;
- LoRA (the code's, as `methods/lora.py`): qkv(x) + B A dropout₀.₁(x), A: D → l_i, B: l_i → 3D;
- adapter (the code's, as `methods/adapter.py`): after the MLP and its drop-path,
  h + up(dropout₀.₁(QuickGELU(down h)));
- LoRA's and the adapter's Linears, and the head, re-initialised truncated-normal std 0.02, biases 0 (the code's
  `apply(_init_weights)`, `methods/_timm_init.py`); drop-path 0.1.
Weight sharing (`AutoFormer`-style slicing): a width w uses the first w rows of A, the first w columns of B, the first
w hidden units of the adapter and the first w prompt tokens of the supernet's largest module.

Stages (the suite's pruning stage, `decides_from = "trained"`):
1. supernet (the dense run, `dense_config()`): the model `create` builds. In training each forward draws a random
   subnet (per module a depth from `depths`, then per block a width from `dims`; zero after the depth), as the code's
   `sample_configs` per step; modules a draw leaves out get a zero gradient (the code's PyTorch-1.x runs kept zeroed
   gradients of unused modules, so AdamW still decayed and moved them). In evaluation: the largest subnet (every
   module at max(dims) in every block; the code evaluates a random one). Recipe (`slurm_train_vtab.sh`): 500
   epochs (`supernet_epochs`; `tiny()`: 2), AdamW lr 5e-4 (`supernet_lr`), wd 1e-4, batch 64, timm cosine, warm-up
   10 epochs, on train800. The supernet holds max(dims) rows per module (the code allocates 100 and slices);
2. search (`prune_candidates`, `methods/_noah_search.py`): NOAH's evolution (`slurm_search_vtab.sh`: 15 generations;
   `evolution.py`: population 50, top 10, 25 mutants, 25 children, m_prob 0.2, s_prob 0.4, seed 0) under
   `param_limit` (millions; the script passes its first argument, `evolution.py`'s default is 0.64). A subnet's
   fitness is its top-1 accuracy with the supernet's weights on the tune mode's validation split (val200, as the code:
   `general_dataset` in `search` mode; `decides_on = "eval"`). The count compared with the limit is the code's
   `get_sampled_params_numel`: the modules' parameters (head excluded), plus, with `count_input_prompt`, the code's
   input prompt p₀·D and position embedding 100·D, which block 0 replaces before any use (counted, never built).
   One candidate comes back; `info` records its widths per module;
3. retrain (`apply_pruning` on a fresh model, `slurm_retrain_vtab.sh`): the chosen subnet from the pretrained backbone;
   100 epochs, AdamW lr 1e-3, wd 1e-4, batch 64 (`recipe`; the grid protocol's is PETL_Vision's, NOAH searched none).

Search space: the published VTAB subnets (`experiments/NOAH/subnet/VTAB/*.yaml`) use widths {1, 5, 10} at depth 12
(`supernet-B_prompt_VTAB.yaml`'s space); the scripts name `supernet-B_prompt.yaml` (and the paper) {5, 10, 50, 100}. Default `dims=1,5,10`, `depths=3,6,9,12` (either is a `--set`). NOAH's tables
selected the retrained epoch on the test set (NOAH#6); the suite reports the last epoch.

Parameters (ViT-B/16, D = 768, L = 12, R = max(dims)): the supernet, as `create` builds it, L·(7DR + R + D):
prompts R·D, LoRA 4D·R, adapter 2DR + R + D per block; 654,456 at R = 10. A subnet: Σ_i p_i·D + 4D·l_i
+ [a_i > 0](2D·a_i + a_i + D) (the published caltech101 subnet: 426,313; with the code's input prompt, 506,953).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Self

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from methods import _checks
from methods._base import HEAD_INITS, MethodConfig, ParamReport, PeftModel, PruneCandidate, Recipe, TunableModule
from methods._family import Backbone, backbone_report
from methods._inject import ParallelLinear, Wrapped, addmm_into, embed, pool, replace_module
from methods._noah_search import Candidate, Evolution, split
from methods._petl_recipe import petl_recipe, timm_no_weight_decay
from methods._registry import register_method
from methods._timm_init import reinit_linears, reinit_weight
from methods.convpass import QuickGELU

MODULES = ("prompt", "lora", "adapter")


class SlicedPrompt(TunableModule):
    """`rows` prompt tokens [rows, D]; the first `width` are used."""

    def __init__(self, rows: int, dim: int, *, init_rows: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(rows, dim))
        bound = math.sqrt(6.0 / (init_rows * dim + dim))  # xavier-uniform of the code's [1, init_rows, D] tensor
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.width = rows

    def forward(self, batch: int) -> Tensor:
        return self.dropout(self.tokens[: self.width]).unsqueeze(0).expand(batch, -1, -1)


class SlicedLoRA(TunableModule):
    """B[:, :w] A[:w] dropout(x) beside the frozen qkv; width 0 adds nothing."""

    def __init__(self, dim: int, out: int, rows: int, *, dropout: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rows, dim))
        self.b = nn.Parameter(torch.empty(out, rows))
        reinit_weight(self.a)
        reinit_weight(self.b)
        self.dropout = nn.Dropout(dropout)
        self.width = rows

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        if self.width == 0:
            return y
        return addmm_into(y, F.linear(self.dropout(x), self.a[: self.width]), self.b[:, : self.width], 1.0)


class SlicedAdapter(TunableModule):
    """h + up[:, :w](dropout(QuickGELU(down[:w] h))) (NOAH's `AdapterSuper`); width 0 is the identity."""

    def __init__(self, dim: int, rows: int, *, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rows)
        self.up = nn.Linear(rows, dim)
        reinit_linears([self])
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.width = rows

    def forward(self, h: Tensor) -> Tensor:
        w = self.width
        if w == 0:
            return h
        z = self.dropout(self.act(F.linear(h, self.down.weight[:w], self.down.bias[:w])))
        return h + F.linear(z, self.up.weight[:, :w], self.up.bias)


class NOAHModel(PeftModel):
    """The supernet (`arch` None: a random subnet per training forward, the largest in evaluation) or, after
    `apply_pruning`, one fixed subnet whose modules are sized to its widths."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: NOAHConfig) -> None:
        super().__init__(backbone, num_classes, head_init=config.head_init)
        self.config = config
        self.arch: dict[str, list[int]] | None = None
        # The supernet's draws (Python's, as the code's `random`), seeded from the run's torch seed: no tensor read.
        self.rng = random.Random(int(torch.randint(2**31, ())))
        self.prompts = nn.ModuleDict()
        self._build([config.max_dim] * len(backbone.blocks), [config.max_dim] * len(backbone.blocks),
                    [config.max_dim] * len(backbone.blocks))  # fmt: skip

    def _build(self, prompt: list[int], lora: list[int], adapter: list[int]) -> None:
        cfg, d = self.config, self.backbone.embed_dim
        for i, block in enumerate(self.backbone.blocks):
            if isinstance(block.attn.qkv, ParallelLinear):  # undo a previous build
                block.attn.qkv = block.attn.qkv.linear
            if isinstance(block.drop_path2, Wrapped):
                block.drop_path2 = block.drop_path2.module
            if str(i) in self.prompts:
                del self.prompts[str(i)]
            if prompt[i]:
                self.prompts[str(i)] = SlicedPrompt(prompt[i], d, init_rows=cfg.supernet_rows, dropout=cfg.dropout)
        for i, block in enumerate(self.backbone.blocks):  # the Linears after every prompt, as NOAH's re-init order
            if lora[i]:
                qkv = block.attn.qkv
                branch = SlicedLoRA(d, qkv.out_features, lora[i], dropout=cfg.dropout)
                replace_module(block, "attn.qkv", ParallelLinear(qkv, branch))
            if adapter[i]:
                adapter_module = SlicedAdapter(d, adapter[i], dropout=cfg.dropout)
                replace_module(block, "drop_path2", Wrapped(block.drop_path2, after=adapter_module))

    # -- the modules of block i ------------------------------------------------------------------
    def module(self, kind: str, i: int) -> TunableModule | None:
        block = self.backbone.blocks[i]
        if kind == "prompt":
            return self.prompts[str(i)] if str(i) in self.prompts else None  # noqa: SIM401 (no ModuleDict.get)
        holder = block.attn.qkv if kind == "lora" else block.drop_path2
        return getattr(holder, "branch" if kind == "lora" else "after", None)

    def set_widths(self, widths: dict[str, list[int]]) -> None:
        """Use these widths of the supernet's modules (each at most its size)."""
        for kind in MODULES:
            for i, w in enumerate(widths[kind]):
                m = self.module(kind, i)
                if m is not None:
                    m.width = w
                elif w:
                    raise ValueError(f"block {i} has no {kind} module for width {w}")

    def sample(self) -> None:
        cfg, blocks = self.config, len(self.backbone.blocks)
        depths = [self.rng.choice(cfg.depth_choices) for _ in MODULES]
        self.set_widths({kind: [self.rng.choice(cfg.dim_choices) if i < depth else 0 for i in range(blocks)]
                         for kind, depth in zip(MODULES, depths, strict=True)})  # fmt: skip

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        zero = None
        if self.arch is None:
            if self.training:
                self.sample()
                # Modules a draw leaves out get zero gradients (not none), as in the code's runs.
                zero = sum(p.sum() for p in self.tunable_parameters()) * 0.0
            else:
                self.set_widths({kind: [self.config.max_dim] * len(self.backbone.blocks) for kind in MODULES})
        x = embed(self.backbone, x)
        n, carried = x.shape[1], 0
        for i, block in enumerate(self.backbone.blocks):
            prompt = self.module("prompt", i)
            if prompt is not None and prompt.width:
                x = torch.cat([x[:, : x.shape[1] - carried], prompt(x.shape[0]).to(x.dtype)], dim=1)
                carried = prompt.width
            x = block(x)
        features = pool(self.backbone, self.backbone.norm(x[:, :n]))
        return features if zero is None else features + zero

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        return timm_no_weight_decay(self)

    def apply_pruning(self, state: dict[str, Tensor]) -> None:
        """Turn this (freshly built) supernet into the fixed subnet `state` encodes (`<module>_dims`: one width per
        block), each module built at its width from a fresh draw: NOAH retrains the subnet from scratch."""
        blocks = len(self.backbone.blocks)
        widths = {}
        for kind in MODULES:
            t = state.get(f"{kind}_dims")
            if t is None or t.shape != (blocks,) or bool((t < 0).any()):
                raise ValueError(f"noah: the decision needs {kind}_dims, {blocks} widths >= 0")
            widths[kind] = [int(w) for w in t]
        self._build(widths["prompt"], widths["lora"], widths["adapter"])
        self.arch = widths
        self.mark_trainable()


def subnet_params(d: int, widths: dict[str, list[int]]) -> int:
    """A subnet's module parameters: Σ p_i·D + 4D·l_i + [a_i > 0](2D·a_i + a_i + D)."""
    return (sum(widths["prompt"]) * d + 4 * d * sum(widths["lora"])
            + sum(2 * d * a + a + d for a in widths["adapter"] if a))  # fmt: skip


def parse_ints(config: MethodConfig, name: str, low: int) -> tuple[int, ...]:
    text = getattr(config, name)
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise _checks.invalid(config, name, "must be comma-separated integers") from None
    if not values or min(values) < low or len(set(values)) != len(values):
        raise _checks.invalid(config, name, f"must be distinct integers >= {low}")
    return tuple(sorted(values))


@register_method("noah")
@dataclass
class NOAHConfig(MethodConfig):
    """NOAH: supernet of prompts + LoRA + adapter, evolutionary search under a parameter limit, retrained subnet.

    Attributes:
        dims: the widths a module may take in a block (prompt length, LoRA rank, adapter width), comma-separated.
        depths: the depths a module may take (present in the first `depth` blocks; 0: absent).
        supernet_rows: the code's allocated module size: sets the prompts' xavier bound and the counted input
            position embedding.
        count_input_prompt: count the code's unused input prompt (p₀ + supernet_rows)·D against the limit.
        param_limit / min_param_limit: the search's bounds on a subnet's count, in millions (head excluded).
        supernet_epochs / supernet_lr: the supernet (dense) run's epochs and learning rate.
        population, generations, select, mutation_num, crossover_num, m_prob, s_prob, search_seed: the evolution
            (`methods/_noah_search.py`); mutation_num / crossover_num None: population // 2 each (the code's 25);
            select is capped at the population.
        dropout: on the prompts, LoRA's input and the adapter's bottleneck.
        drop_path_rate: the backbone's stochastic depth.
        head_init: `trunc_normal` (NOAH), `torch` or `vpt`.
    """

    category: ClassVar[str] = "selection"
    needs: ClassVar[str] = (
        "a ViT's blocks with a fused qkv Linear and a token sequence to append prompts to (timm's VisionTransformer)"
    )
    decides_on: ClassVar[str] = "eval"  # the search scores subnets on val200, as the code

    recipe: Recipe = field(default_factory=petl_recipe)
    dims: str = "1,5,10"
    depths: str = "3,6,9,12"
    supernet_rows: int = 100
    count_input_prompt: bool = True
    param_limit: float = 0.64
    min_param_limit: float = 0.0
    supernet_epochs: int = 500
    supernet_lr: float = 5e-4
    population: int = 50
    generations: int = 15
    select: int = 10
    mutation_num: int | None = None
    crossover_num: int | None = None
    m_prob: float = 0.2
    s_prob: float = 0.4
    search_seed: int = 0
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    head_init: str = "trunc_normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choices({"head_init": HEAD_INITS})
        self.dim_choices = parse_ints(self, "dims", 1)
        self.depth_choices = parse_ints(self, "depths", 0)
        _checks.integer(self, "supernet_rows", self.max_dim)
        _checks.real(self, "param_limit", 0.0, low_open=True)
        _checks.real(self, "min_param_limit", 0.0, self.param_limit)
        _checks.integer(self, "supernet_epochs", 1)
        _checks.real(self, "supernet_lr", 0.0, low_open=True)
        _checks.integer(self, "population", 1)
        _checks.integer(self, "generations", 0)
        _checks.integer(self, "select", 1)
        _checks.integer(self, "mutation_num", 0, none_ok=True)
        _checks.integer(self, "crossover_num", 0, none_ok=True)
        _checks.real(self, "m_prob", 0.0, 1.0)
        _checks.real(self, "s_prob", 0.0, 1.0)
        _checks.integer(self, "search_seed", 0)
        _checks.rates(self, "dropout", "drop_path_rate")

    @property
    def max_dim(self) -> int:
        return max(self.dim_choices)

    @property
    def prunes(self) -> bool:
        return True

    @classmethod
    def tiny(cls) -> Self:
        return cls(dims="1,2", depths="1,2,3", supernet_rows=4, population=4, generations=2, supernet_epochs=2)

    def check_backbone(self, backbone: Backbone) -> None:
        blocks = len(backbone.blocks)
        if max(self.depth_choices) > blocks:
            raise _checks.invalid(
                self,
                "depths",
                f"goes beyond the backbone's {blocks} blocks",
                ",".join(str(d) for d in self.depth_choices if d <= blocks) or str(blocks),
            )
        smallest = {kind: [min(self.dim_choices)] * min(self.depth_choices) + [0] * (blocks - min(self.depth_choices))
                    for kind in MODULES}  # fmt: skip
        low = self.search_params(backbone.embed_dim, smallest)
        if self.param_limit * 1e6 < low:
            raise _checks.invalid(self, "param_limit", f"is below the smallest subnet's {low} parameters",
                                  low / 1e6)  # fmt: skip

    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def dense_config(self) -> Self:
        return dataclasses.replace(
            self, recipe=dataclasses.replace(self.recipe, epochs=self.supernet_epochs, lr=self.supernet_lr)
        )

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return NOAHModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        d, r = backbone.embed_dim, self.max_dim
        return backbone_report(backbone, num_classes, len(backbone.blocks) * (7 * d * r + r + d))

    def search_params(self, d: int, widths: dict[str, list[int]]) -> int:
        """What the limit is compared with: the subnet's modules plus, with `count_input_prompt`, the code's input
        prompt and its position embedding."""
        prompt = widths["prompt"][0]
        extra = (prompt + self.supernet_rows) * d if self.count_input_prompt and prompt else 0
        return subnet_params(d, widths) + extra

    def prune_candidates(
        self, model: PeftModel, initial_state: dict[str, Tensor], batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[PruneCandidate]:
        """Search the trained supernet `model`; fitness: top-1 accuracy on `batches` (val200, kept for every
        candidate, as NOAH scores). One candidate: the chosen subnet."""
        assert isinstance(model, NOAHModel)
        data = list(batches)
        blocks, d = len(model.backbone.blocks), model.backbone.embed_dim
        to_widths = lambda cand: dict(zip(MODULES, split(cand, blocks), strict=True))  # noqa: E731

        @torch.no_grad()
        def fitness(cand: Candidate) -> float:
            model.eval()
            model.arch = to_widths(cand)
            model.set_widths(model.arch)
            correct = total = 0
            for images, labels in data:
                with torch.autocast("cuda", torch.bfloat16, enabled=images.is_cuda):
                    correct += int((model(images).argmax(-1) == labels).sum())
                total += labels.numel()
            return correct / max(total, 1)

        half = self.population // 2
        search = Evolution(
            blocks, self.dim_choices, self.depth_choices, lambda c: self.search_params(d, to_widths(c)), fitness,
            self.param_limit * 1e6, self.min_param_limit * 1e6, self.population, self.generations,
            min(self.select, self.population),
            half if self.mutation_num is None else self.mutation_num,
            half if self.crossover_num is None else self.crossover_num, self.m_prob, self.s_prob, self.search_seed,
        )  # fmt: skip
        try:
            best, acc = search.run()
        finally:
            model.arch = None
        widths = to_widths(best)
        state = {f"{kind}_dims": torch.tensor(w, dtype=torch.int32) for kind, w in widths.items()}
        info = {
            **{f"{kind}_dims": w for kind, w in widths.items()},
            **{f"{kind}_depth": sum(1 for x in w if x) for kind, w in widths.items()},
            "subnet_params": subnet_params(d, widths), "search_params": self.search_params(d, widths),
            "fitness": acc, "evaluated": len(search.scores), "best_per_generation": search.trace,
        }  # fmt: skip
        return [PruneCandidate("subnet", state, info)]
