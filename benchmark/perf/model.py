"""`python -m benchmark perf`: training-step speed and memory of every method, against the physical floor.

What is timed, per method, is the suite's own training step: `ClassificationModule.training_step` (the
method's forward, cross-entropy, the method's regularisation term), backward, and the optimiser of
`configure_optimizers` — the same objects a run trains, under the same autocast Lightning applies for
`--precision bf16`. Lightning's loop itself adds one hook dispatch per step and is not part of it.

The floor: the frozen backbone's forward plus backward with respect to its input tokens (the patch
embedding runs forward only, as in every method whose embedding is frozen), on the same number of tokens
the method feeds its blocks (prompts included), through a frozen head of the task's classes; no weight
gradients. On a Swin the floor is its plain frozen forward on the patch map (prompts, which a Swin carries beside
the map and replicates into every window, are not added to it: its methods are counted at the patch count). No method that tunes anything at the input of the first block can do less, so `x_floor`
says how much a method adds on top of the unavoidable work. Methods that tune nothing below the head
(the linear probe) can, and land below 1.

Every registered method is timed (`--methods all`): a method that cannot be built or stepped on the backbone gets a
row saying why in one line instead of ending the run, and a row's note says how a method was timed when that is not
simply its model for the task: a method with a pruning or search stage is timed as built, before the task's decision
(the dense stage's model, or the supernet, for a decision from a trained model; the default selection of the
decision's size for one from the pretrained model); a frozen-feature method (`PeftModel.features_frozen`) is timed
end to end and, separately, as its head alone on cached features; a method whose defaults do not fit a tiny test
backbone is timed with its `tiny()` settings.

Noise control: every model is built first and kept alive; after warm-up, each round times one step of
every candidate (methods and floors) in a rotated order, and a candidate's step time is the median of
its rounds, so slow drifts of a shared machine hit every candidate alike and ratios are side by side.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from benchmark.core.device import sync
from benchmark.perf.build import (
    Unbuilt,
    floor_candidate,
    method_candidate,
    plain_candidate,
    training_step,
)
from benchmark.perf.report import floor_rows, result_rows
from benchmark.perf.timing import (
    Candidate,
    PeakMemory,
    Variant,
    device_name,
    eval_throughput,
    interleaved,
    measure_memory,
    memory_kind,
    one_line,
    time_call,
    untimed,
)
from benchmark.run.module import ClassificationModule
from methods import (
    Backbone,
    MethodConfig,
    NotMergeableError,
)
from tasks import Task


@dataclass
class PerfSpec:
    backbone: str
    image_size: int
    batch_size: int
    task: Task
    variants: tuple[Variant, ...]
    warmup: int = 2
    repeats: int = 5
    eval_repeats: int = 3
    compile: bool = False


def synthetic_batch(n: int, image_size: int, num_classes: int, device: torch.device, seed: int = 0):
    """Normalised random images and labels: step time does not depend on pixel values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x.to(device), y.to(device)


def measure_models(
    spec: PerfSpec,
    configs: Iterable[MethodConfig],
    backbone: Backbone,
    device: torch.device,
    *,
    extra_floor_tokens: Iterable[int] = (),
    progress: Callable[[str], None] | None = None,
) -> list[Candidate]:
    """Build every (method, variant) and the floors at their token counts, measure memory while building,
    then time all of them interleaved."""
    say = progress or (lambda s: None)
    memory = PeakMemory(device)
    batch = synthetic_batch(spec.batch_size, spec.image_size, spec.task.num_classes, device)
    backbone = backbone.to(device)
    candidates: list[Candidate] = []
    configs = list(configs)
    for variant in spec.variants:
        for config in configs:
            if isinstance(config, Unbuilt):
                candidates.append(untimed(config.name, variant, config.reason))
                continue
            say(f"building {config.name} ({variant.label})")
            sync(device)
            memory.settle()
            before = memory.current()
            try:
                c = method_candidate(config, backbone, spec.task, batch, variant, device, compile=spec.compile)
                for _ in range(max(1, spec.warmup)):
                    c.step()
                c.warm = True
                measure_memory(c, memory, before)
            except Exception as e:  # any method's failure is its row's, never the whole report's
                c = untimed(config.name, variant, e)
                say(f"{config.name} cannot be timed: {c.error}")
            candidates.append(c)
        timed = {c.tokens for c in candidates if c.variant == variant and c.kind == "method" and c.timed}
        frozen = copy.deepcopy(backbone).requires_grad_(False)  # one copy for all of this variant's floors
        for t in sorted(timed | set(extra_floor_tokens)):
            candidates.append(
                floor_candidate(frozen, t, spec.task.num_classes, batch, variant, device, compile=spec.compile,
                                shared=True)
            )  # fmt: skip
    say(f"timing {len(candidates)} candidates: {spec.warmup} warm-up steps, {spec.repeats} rounds")
    interleaved(candidates, warmup=spec.warmup, repeats=spec.repeats, device=device, progress=say)
    return candidates


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def hot_spots(c: Candidate, top: int = 3) -> list[str]:
    """The operators taking the most self time in one training step of `c` (torch.profiler), as
    `name share%` strings: what to look at when a method misses its target."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        c.step()
    events = prof.key_averages()
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [f"{e.key} {100 * getattr(e, attr) / total:.0f}%" for e in ranked]


def head_candidate(config: MethodConfig, backbone: Backbone, task: Task, batch_size: int, image_size: int,
                   device: torch.device) -> Candidate:  # fmt: skip
    """A frozen-feature method's step on cached features: what a run of it trains (the linear probe's head, an MLP
    head), on features of the width its `forward_features` gives."""
    model = config.build(copy.deepcopy(backbone), task.num_classes).to(device)
    module = ClassificationModule(model, num_classes=task.num_classes, recipe=config.recipe, inputs="features")
    with torch.no_grad():
        width = model.eval().forward_features(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(batch_size, width, generator=g).to(device),
        torch.randint(0, task.num_classes, (batch_size,), generator=g).to(device),
    )
    step = training_step(module.to(device), batch, Variant(), device)
    return Candidate(f"{config.name} (head on features)", "head", Variant(), 0, step)


def frozen_feature_task(c: Candidate, row: dict[str, Any], backbone: Backbone, task: Task, batch_size: int,
                        image_size: int, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """A frozen-feature method over one task: features of train800val200 and test once (at its evaluation
    throughput), then its recipe's epochs of the head alone on cached features, against training end to end."""
    head = head_candidate(c.config, backbone, task, batch_size, image_size, device)
    for _ in range(3):
        head.step()
    head_ips = batch_size / statistics.median(time_call(head.step, device) for _ in range(20))
    epochs = c.config.recipe.epochs
    return {
        "method": c.name,
        "task": task.id,
        "images": 1000 + task.test_size,
        "features_s": round((1000 + task.test_size) / row["eval_images_per_s"], 2),
        "head_images_per_s": round(head_ips, 1),
        "epochs": epochs,
        "head_training_s": round(epochs * 1000 / head_ips, 2),
        "end_to_end_s": round(epochs * 1000 / row["images_per_s"] + task.test_size / row["eval_images_per_s"], 2),
    }


# -- the command ----------------------------------------------------------------------------------------
def run(
    *,
    backbone_name: str,
    image_size: int,
    batch_size: int,
    configs: list[MethodConfig | Unbuilt],
    variants: tuple[Variant, ...],
    task: Task,
    warmup: int,
    repeats: int,
    eval_batch_size: int,
    eval_repeats: int,
    compile: bool,
    sweep: bool,
    decode_ips: Callable[[], float] | None,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure everything `perf` reports; returns the report (see `write_report` for its files)."""
    from benchmark.perf.estimate import sweep_rows, tokens_per_task
    from benchmark.run.backbone import create_backbone
    from tasks import TASKS

    say = progress or (lambda s: None)
    started = utc_now()
    backbone = create_backbone(backbone_name, pretrained=False, image_size=image_size)
    sweep_tokens: dict[str, dict[str, int]] = {}
    if sweep:
        for cfg in configs:
            if isinstance(cfg, Unbuilt):
                continue
            say(f"token counts of {cfg.name} over the 19 tasks")
            try:
                sweep_tokens[cfg.name] = tokens_per_task(cfg, backbone, TASKS, image_size, device)
            except Exception as e:  # the method's sweep row says why; its training step is still tried
                say(f"{cfg.name}: no token counts over the 19 tasks: {one_line(e)}")
    spec = PerfSpec(
        backbone_name,
        image_size,
        batch_size,
        task,
        variants,
        warmup,
        repeats,
        eval_repeats=eval_repeats,
        compile=compile,
    )
    extra = {t for counts in sweep_tokens.values() for t in counts.values()}
    candidates = measure_models(spec, configs, backbone, device, extra_floor_tokens=extra, progress=say)
    by_key = {(c.name, c.variant): c for c in candidates if c.kind == "method"}

    say(f"evaluation throughput at batch {eval_batch_size}")
    x_eval = synthetic_batch(eval_batch_size, image_size, task.num_classes, device)[0]
    rows = result_rows(candidates, batch_size)
    for row in rows:
        c = by_key[(row["method"], _variant(variants, row["variant"]))]
        row["eval_images_per_s"] = None
        if c.timed:
            try:
                row["eval_images_per_s"] = round(eval_throughput(c, x_eval, repeats=eval_repeats, device=device), 2)
            except Exception as e:
                row["note"] = "; ".join(n for n in (row["note"], f"evaluation failed: {one_line(e)}") if n)

    frozen_eval = merged_eval_throughput(rows, by_key, backbone, task, variants, x_eval, eval_repeats, device, say)
    for row in rows:
        if row["meets_target"] is False:
            c = by_key[(row["method"], _variant(variants, row["variant"]))]
            say(f"profiling {row['method']} ({row['variant']}): {row['x_floor']}x the floor")
            try:
                row["hot_spots"] = hot_spots(c)
            except Exception as e:
                row["hot_spots"] = [f"profiling failed: {one_line(e)}"]

    report: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "started_at": started,
        "finished_at": None,
        "torch": torch.__version__,
        "backbone": backbone_name,
        "image_size": image_size,
        "batch_size": batch_size,
        "task": task.id,
        "num_classes": task.num_classes,
        "warmup_steps": warmup,
        "repeats": repeats,
        "eval_batch_size": eval_batch_size,
        "compile": compile,
        "memory_kind": memory_kind(device),
        "rows": rows,
        "floors": floor_rows(candidates),
        "frozen_eval_images_per_s": frozen_eval,
    }

    # Every frozen-feature method (the linear probe, an MLP head, ...): its head alone on cached features.
    report["frozen_feature_tasks"] = []
    head_ips: dict[str, float] = {}
    for row in rows:
        c = by_key[(row["method"], _variant(variants, row["variant"]))]
        if c.variant != variants[0] or not c.features_frozen or row["eval_images_per_s"] is None:
            continue
        say(f"{c.name}: its head on cached features")
        try:
            ft = frozen_feature_task(c, row, backbone, task, batch_size, image_size, device)
        except Exception as e:
            row["note"] = f"{row['note']}; head on features untimed: {one_line(e)}"
            continue
        report["frozen_feature_tasks"].append(ft)
        head_ips[c.name] = ft["head_images_per_s"]

    if sweep:
        report["sweep"] = sweep_rows(
            candidates, rows, variants, configs, sweep_tokens, x_eval, decode_ips, head_ips, spec, device, say
        )
    report["finished_at"] = utc_now()
    return report


def merged_eval_throughput(rows, by_key, backbone, task, variants, x_eval, repeats, device, say) -> dict[str, float]:
    """Evaluation images/s of each re-parameterisable method's merged model (`PeftModel.merged_backbone` plus
    its head: a plain timm ViT) into `merged_eval_images_per_s` of its rows (None for the others, and for an
    untimed method; a merge that fails says so in the row's note), and of the frozen backbone with a head, per
    variant (returned): the two are the same network, so they should match."""
    say("evaluation throughput of the merged models and of the frozen backbone")
    frozen = {}
    for variant in variants:
        vit = copy.deepcopy(backbone)
        vit.reset_classifier(task.num_classes)
        c = plain_candidate("frozen backbone", vit, variant, device)
        frozen[variant.label] = round(eval_throughput(c, x_eval, repeats=repeats, device=device), 2)
    for row in rows:
        row["merged_eval_images_per_s"] = None
        variant = _variant(variants, row["variant"])
        timed = by_key[(row["method"], variant)]
        if row["step_ms"] is None:
            continue
        try:  # the timed model itself (its values do not change the merged network's cost), or a fresh one
            model = timed.model or timed.config.build(copy.deepcopy(backbone), task.num_classes)
            merged = model.merged_backbone()
        except NotMergeableError:
            continue
        except Exception as e:
            row["note"] = "; ".join(n for n in (row["note"], f"merge failed: {one_line(e)}") if n)
            continue
        merged.reset_classifier(task.num_classes)
        merged.get_classifier().load_state_dict(model.head.state_dict())
        c = plain_candidate(f"{row['method']} merged", merged, variant, device)
        row["merged_eval_images_per_s"] = round(eval_throughput(c, x_eval, repeats=repeats, device=device), 2)
    return frozen


def _variant(variants: tuple[Variant, ...], label: str) -> Variant:
    return next(v for v in variants if v.label == label)
