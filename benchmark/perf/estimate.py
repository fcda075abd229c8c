"""`perf --sweep`: the predicted wall time of a 19-task run per method, from the rates `perf` measures.

Moved out of `perf_model.py` unchanged: the per-task token counts, the cost model (`predict_sweep`) and the
rows of the report's sweep table.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from benchmark.perf.timing import count_tokens, eval_throughput, step_ms
from methods import Backbone, MethodConfig
from tasks import Task


def tokens_per_task(config: MethodConfig, backbone: Backbone, tasks: Iterable[Task], image_size: int,
                    device: torch.device) -> dict[str, int]:  # fmt: skip
    """The token count entering the first block for each task's settings (e.g. VPT's per-task prompt length);
    one model per distinct setting (the settings `perf` times: `timed_config`)."""
    import json

    from benchmark.perf.build import timed_config

    seen: dict[str, int] = {}
    out = {}
    for task in tasks:
        cfg, _ = timed_config(config, backbone, task)
        key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "recipe"}, sort_keys=True, default=str)
        if key not in seen:
            model = cfg.build(copy.deepcopy(backbone), task.num_classes).to(device)
            seen[key] = count_tokens(model, image_size, device)
            del model
        out[task.id] = seen[key]
    return out


@dataclass
class SweepCosts:
    """Measured rates one sweep prediction combines (seconds per image are the reciprocals)."""

    step_ms: float  # training step of the method at `tokens` (our precision)
    step_ms_fp32: float  # the same in fp32 (the official trainers' numerics)
    batch_size: int
    tokens: int
    eval_ips: float  # evaluation images/s at our large batch
    eval_ips_official: float  # evaluation images/s at the training batch, fp32
    decode_ips: float  # image decode + resize images/s
    floor_ms: dict[int, float]  # floor step per token count (for the per-task token counts)
    floor_ms_fp32: dict[int, float]
    head_ips: float | None = None  # frozen-feature methods: head steps on cached features, images/s


def predict_sweep(costs: SweepCosts, tasks: Iterable[Task], tokens: dict[str, int], epochs: int,
                  train_images: int = 1000) -> dict[str, float]:  # fmt: skip
    """Predicted seconds of one method's VTAB-1k final run per task set (one seed; `epochs` on train800val200,
    then the test split), ours against the official trainers' pattern.

    Ours: each split decoded once into the uint8 cache; training at the measured step; the test split
    evaluated once at the large batch. Frozen-feature methods: features of both splits once, then the head.
    Official pattern: fp32, every image decoded every epoch and the whole test split evaluated after every
    epoch at the training batch; decoding is assumed to overlap compute perfectly (DataLoader workers on
    spare cores), which is the most favourable case for it. A task's token count scales both patterns by
    the floor's step at that count over the floor's step at the measured count: the method's ratio to the
    floor is assumed to hold across token counts.
    """
    ours = dict(decode=0.0, train=0.0, eval=0.0)
    official = dict(train=0.0, eval=0.0)
    for task in tasks:
        scale = costs.floor_ms[tokens[task.id]] / costs.floor_ms[costs.tokens]
        scale32 = costs.floor_ms_fp32[tokens[task.id]] / costs.floor_ms_fp32[costs.tokens]
        n, m = train_images, task.test_size
        ours["decode"] += (n + m) / costs.decode_ips
        if costs.head_ips is not None:
            ours["eval"] += (n + m) / costs.eval_ips * scale  # features once
            ours["train"] += epochs * n / costs.head_ips
        else:
            ours["train"] += epochs * n * costs.step_ms / 1000 / costs.batch_size * scale
            ours["eval"] += m / costs.eval_ips * scale
        train32 = n * costs.step_ms_fp32 / 1000 / costs.batch_size * scale32
        official["train"] += epochs * max(train32, n / costs.decode_ips)
        official["eval"] += epochs * max(m / costs.eval_ips_official * scale32, m / costs.decode_ips)
    ours_s, official_s = sum(ours.values()), sum(official.values())
    return {
        "ours_s": ours_s,
        **{f"ours_{k}_s": v for k, v in ours.items()},
        "official_s": official_s,
        **{f"official_{k}_s": v for k, v in official.items()},
        "speedup": official_s / ours_s,
    }


def sweep_rows(candidates, rows, variants, configs, sweep_tokens, x_eval, decode_ips, head_ips, spec, device, say):
    """Predicted 19-task wall time per method (see `predict_sweep`), ours against the official pattern; a method
    that could not be timed (or whose per-task token counts could not be read) gets a row saying so. `head_ips`:
    the frozen-feature methods' head images/s on cached features, by name."""
    from tasks import TASKS

    ours_v = variants[0]
    fp32 = [v for v in variants if v.precision == "32"]
    official_v = next((v for v in fp32 if v.attention == "explicit"), fp32[0] if fp32 else None)
    floors = {(c.variant, c.tokens): step_ms(c) for c in candidates if c.kind == "floor"}
    by_key = {(c.name, c.variant): c for c in candidates if c.kind == "method"}
    say("decode throughput")
    decode = decode_ips() if decode_ips else float("inf")
    say(f"evaluation throughput at the training batch ({spec.batch_size}), official pattern")
    x_small = x_eval[: spec.batch_size]
    out = []
    for cfg in configs:
        ours = by_key[(cfg.name, ours_v)]
        off = by_key[(cfg.name, official_v)] if official_v else ours
        row = next(r for r in rows if r["method"] == cfg.name and r["variant"] == ours_v.label)
        why = (
            "its training step is untimed" if not (ours.timed and off.timed)
            else "no evaluation throughput" if row.get("eval_images_per_s") is None
            else "no per-task token counts (building it for some task's settings failed)"
            if cfg.name not in sweep_tokens else None
        )  # fmt: skip
        if why is not None:
            out.append({"method": cfg.name, "note": f"not predicted: {why}"})
            continue
        costs = SweepCosts(
            step_ms=step_ms(ours),
            step_ms_fp32=step_ms(off),
            batch_size=spec.batch_size,
            tokens=ours.tokens,
            eval_ips=row["eval_images_per_s"],
            eval_ips_official=eval_throughput(off, x_small, repeats=spec.eval_repeats, device=device),
            decode_ips=decode,
            floor_ms={t: ms for (v, t), ms in floors.items() if v == ours_v},
            floor_ms_fp32={t: ms for (v, t), ms in floors.items() if v == (official_v or ours_v)},
            head_ips=head_ips.get(cfg.name),
        )
        pred = predict_sweep(costs, TASKS, sweep_tokens[cfg.name], ours.config.recipe.epochs)
        stage = (
            "plus its decision stage (a dense run first)" if ours.config.trains_dense
            else "plus its decision stage (a pass over train800 per task)" if ours.config.prunes else None
        )  # fmt: skip
        out.append(
            {
                "method": cfg.name,
                "ours_variant": ours_v.label,
                "official_variant": (official_v or ours_v).label,
                "epochs": ours.config.recipe.epochs,
                "tokens": sorted(set(sweep_tokens[cfg.name].values())),
                "decode_images_per_s": round(decode, 1),
                "eval_images_per_s_official": round(costs.eval_ips_official, 2),
                **{k: round(v, 1) if k.endswith("_s") else round(v, 2) for k, v in pred.items()},
                "note": stage,
            }
        )
    return out
