"""The candidates `perf` times: a method's training step as the suite trains it, the frozen floor at a token count,
and a plain backbone; each built once and kept alive for the interleaved rounds (`benchmark.perf.model`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.perf.timing import (
    Candidate,
    Variant,
    autocast,
    count_tokens,
    one_line,
    set_attention,
)
from benchmark.run.module import ClassificationModule
from benchmark.run.resolve import resolve_config
from methods import (
    Backbone,
    MethodConfig,
    PeftModel,
    embed,
    family,
    insert_tokens,
    pool,
    run_blocks,
)
from tasks import Task


def training_step(
    module: ClassificationModule, batch: tuple[Tensor, Tensor], variant: Variant, device: torch.device
) -> Callable[[], None]:
    """One optimisation step of `module` on `batch` (its loss, backward, the optimiser of its recipe)."""
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    module.on_train_epoch_start()

    def step() -> None:
        with autocast(device, variant):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Unbuilt:
    """A registered method whose config cannot even be made (its defaults refused): reported untimed, with why."""

    name: str
    reason: str


# Method options that load pretrained weights, and their random-init value.
RANDOM_WEIGHTS = {"side_weights": "none"}


def timed_config(config: MethodConfig, backbone: Backbone, task: Task) -> tuple[MethodConfig, str | None]:
    """The config `perf` times for `task` (its per-task settings) and a note when it is not that: where those
    settings do not fit `backbone` (`check_backbone`: a tiny test ViT narrower than a width the defaults need),
    the method's `tiny()` settings, said in the note. Raises what the config raises when neither fits."""
    cfg = resolve_config(config, task.id)
    # `perf` times random weights (speed does not depend on them), so an option that loads pretrained weights the
    # suite cannot download (Sidetune's AlexNet) is set to its random init: same shapes, same cost.
    random = {k: v for k, v in RANDOM_WEIGHTS.items() if hasattr(cfg, k) and getattr(cfg, k) != v}
    note = None
    if random:
        cfg = dataclasses.replace(cfg, **random)
        note = f"random {', '.join(f'{k}={v}' for k, v in random.items())} (speed does not depend on weights)"
    try:
        cfg.check_backbone(backbone)
        return cfg, note
    except ValueError as e:
        small = resolve_config(type(config).tiny(), task.id)
        try:
            small.check_backbone(backbone)
        except ValueError:
            raise e from None
        return small, f"its tiny() settings: the defaults do not fit this backbone ({one_line(e, 160)})"


def stage_note(config: MethodConfig, model: PeftModel) -> str | None:
    """How a method's model as built differs from what a run of it trains, when it does (its row's note)."""
    notes = []
    if model.features_frozen:
        notes.append("frozen features: a run trains the head on cached features (see the frozen-feature table)")
    if config.prunes and config.trains_dense:
        notes.append(
            "timed as built: the dense-stage model (a supernet where the method searches one), before the task's "
            "pruning or search decision"
        )
    elif config.prunes:
        notes.append(
            "timed as built: the default selection of the decision's size, not a task's selection from the "
            "pretrained model (same size)"
        )
    return "; ".join(notes) or None


def method_candidate(
    config: MethodConfig,
    backbone: Backbone,
    task: Task,
    batch: tuple[Tensor, Tensor],
    variant: Variant,
    device: torch.device,
    *,
    compile: bool = False,
) -> Candidate:
    """The suite's training step for `config` on `task`: its model, loss and optimiser, on one fixed batch.
    Raises whatever building or a first forward raises (the caller reports the method untimed)."""
    config, fallback = timed_config(config, backbone, task)
    model = config.build(copy.deepcopy(backbone), task.num_classes).to(device)
    set_attention(model, variant.attention)
    module = ClassificationModule(model, num_classes=task.num_classes, recipe=config.recipe).to(device)
    tokens = count_tokens(model, batch[0].shape[-1], device)
    if compile:
        model.compile()  # in place: the module's forward goes through torch.compile
    step = training_step(module, batch, variant, device)

    @torch.inference_mode()
    def evaluate(x: Tensor) -> Tensor:
        module.eval()
        with autocast(device, variant):
            out = module(x)
        module.train()
        return out

    report = model.param_report()
    note = "; ".join(n for n in (fallback, stage_note(config, model)) if n) or None
    params = {"tunable": report.tunable, "head": report.head}
    return Candidate(
        config.name, "method", variant, tokens, step, evaluate, params, config=config, model=None if compile else model,
        features_frozen=model.features_frozen, note=note,
    )  # fmt: skip


def floor_candidate(
    backbone: Backbone, tokens: int, num_classes: int, batch: tuple[Tensor, Tensor], variant: Variant,
    device: torch.device, *, compile: bool = False, shared: bool = False,
) -> Candidate:  # fmt: skip
    """Forward + backward of the frozen `backbone` with respect to its `tokens` input tokens (no weight grads); a
    Swin's floor runs its stages, final norm and pooling on the patch map (its token count must be the patches').
    `shared`: `backbone` is a frozen copy the caller made for this variant's floors, used as it is (the floors
    train nothing, so one copy serves all token counts); otherwise the floor makes its own."""
    vit = (backbone if shared else copy.deepcopy(backbone)).to(device).requires_grad_(False)
    set_attention(vit, variant.attention)
    head = nn.Linear(vit.num_features, num_classes).to(device).requires_grad_(False)
    x, y = batch
    swin = family(vit) == "swin"
    with torch.no_grad():
        first = vit.patch_embed(x[:1]) if swin else embed(vit, x[:1])
    base = first.shape[1] * first.shape[2] if swin else first.shape[1]
    if tokens < base or (swin and tokens != base):
        raise ValueError(
            f"the floor needs {'exactly' if swin else 'at least'} the backbone's {base} tokens, got {tokens}"
        )
    extra = torch.zeros(tokens - base, vit.embed_dim, device=device)
    if compile:
        for block in vit.layers if swin else vit.blocks:
            block.compile()
    prefix = getattr(vit, "num_prefix_tokens", 0)

    def step() -> None:
        with autocast(device, variant):
            with torch.no_grad():
                seq = vit.patch_embed(x) if swin else embed(vit, x)
            seq = insert_tokens(seq, extra, prefix) if len(extra) else seq
            seq.requires_grad_(True)
            if swin:
                features = vit.forward_head(vit.norm(vit.layers(seq)), pre_logits=True)
            else:
                features = pool(vit, run_blocks(vit, seq, lambda i, t: t))
            loss = F.cross_entropy(head(features).float(), y)
        loss.backward()

    return Candidate(f"floor@{tokens}", "floor", variant, tokens, step)


def plain_candidate(name: str, vit: Backbone, variant: Variant, device: torch.device) -> Candidate:
    """Evaluation of a plain timm ViT with its head (no training step): the frozen backbone or a merged model."""
    vit = vit.to(device).eval().requires_grad_(False)
    set_attention(vit, variant.attention)

    @torch.inference_mode()
    def evaluate(x: Tensor) -> Tensor:
        with autocast(device, variant):
            return vit(x)

    return Candidate(name, "plain", variant, 0, lambda: None, evaluate)
