"""`perf`'s report: the rows of the measured tables (ratios to the floor and to full fine-tuning, the targets),
and the report as JSON and as a Markdown page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.perf.timing import (
    Candidate,
    step_ms,
)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def report_stem(report: dict[str, Any]) -> str:
    device = "cpu" if report["device_type"] == "cpu" else _slug(report["device"])
    return f"{device}-{_slug(report['backbone'])}-{report['started_at'][:10]}"


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: settings, the step table, misses with their hot spots, floors, the
    linear probe's cost over a task, and the sweep prediction when measured."""
    import pandas as pd

    r = report
    lines = [
        f"# Training-step performance: {r['device']}, {r['started_at'][:10]}",
        "",
        f"Backbone `{r['backbone']}` (random weights; speed does not depend on them) at {r['image_size']} px, "
        f"batch {r['batch_size']}, task `{r['task']}` ({r['num_classes']} classes, its per-task method settings); "
        f"torch {r['torch']}; {r['warmup_steps']} warm-up steps, then the median of {r['repeats']} interleaved "
        f"rounds; torch.compile {'on' if r['compile'] else 'off'}. Measured {r['started_at']} to "
        f"{r['finished_at']} by `python -m benchmark perf`.",
        "",
        "- **× floor**: the method's training step over the floor at its token count: the frozen backbone's "
        "forward and backward with respect to its input tokens, no weight gradients.",
        "- **× full**: over full fine-tuning's step (same variant). **peak MiB**: "
        f"{r['memory_kind']}, above the level before the model was built (its weights, gradients, optimiser "
        "state and a step's activations).",
        f"- **eval img/s**: inference-mode forward at batch {r['eval_batch_size']}. **merged eval img/s**: the same "
        "for a re-parameterisable method's merged model (`export --merge`: the method folded into the weights, a "
        "plain timm ViT), beside the frozen backbone with a head: "
        + (", ".join(f"{v}: {ips:.1f} img/s" for v, ips in (r.get("frozen_eval_images_per_s") or {}).items()) or "-")
        + ".",
        "",
    ]
    table = [
        {
            "method": x["method"],
            "variant": x["variant"],
            "tokens": _fmt(x["tokens"]),
            "step ms": _fmt(x["step_ms"], ".0f"),
            "img/s": _fmt(x["images_per_s"], ".2f"),
            "floor ms": _fmt(x["floor_ms"], ".0f"),
            "× floor": _fmt(x["x_floor"], ".3f"),
            "target": _fmt(x["target_x_floor"], ".2f"),
            "meets": _fmt(x["meets_target"]),
            "× full": _fmt(x["x_full"], ".3f"),
            "peak MiB": _fmt(x["peak_memory_mb"], ".0f"),
            "mem × full": _fmt(x["memory_x_full"], ".3f"),
            "eval img/s": _fmt(x.get("eval_images_per_s"), ".1f"),
            "merged eval img/s": _fmt(x.get("merged_eval_images_per_s"), ".1f"),
            "tunable": _fmt(x["tunable_params"], ","),
            "note": x.get("note") or "",
        }
        for x in r["rows"]
    ]
    lines += [pd.DataFrame(table).to_markdown(index=False), ""]
    untimed = [x for x in r["rows"] if x["step_ms"] is None]
    if untimed:
        lines += [f"Untimed: {len(untimed)} of {len(r['rows'])} rows (the note of each says why).", ""]
    misses = [x for x in r["rows"] if x["meets_target"] is False]
    if misses:
        lines += ["Targets missed (hot spots: the operators with the most self time in one profiled step):", ""]
        for x in misses:
            over = 100 * (x["x_floor"] / x["target_x_floor"] - 1)
            lines.append(
                f"- `{x['method']}` ({x['variant']}): {x['x_floor']:.3f}× the floor, {over:.0f}% over its "
                f"{x['target_x_floor']}× target; hot spots: {', '.join(x.get('hot_spots', [])) or '-'}."
            )
        lines.append("")
    lines += ["## Floor", "", pd.DataFrame(r["floors"]).to_markdown(index=False), ""]
    # Reports written before every frozen-feature method was timed hold the linear probe's alone (`linear_task`).
    feature_tasks = r.get("frozen_feature_tasks") or (
        [{"method": "linear", **r["linear_task"]}] if "linear_task" in r else []
    )
    if feature_tasks:
        lines += [
            "## Frozen-feature methods over one task",
            "",
            "Methods that train nothing before the head (`features_frozen`: the linear probe, an MLP head) run as: "
            "features of the train800val200 and test images once, at the evaluation throughput, then the recipe's "
            "epochs of the head on cached features; against training end to end through the frozen backbone.",
            "",
        ]
        table = [
            {
                "method": lt["method"],
                "task": lt["task"],
                "images": f"{lt['images']:,}",
                "features s": lt["features_s"],
                "head img/s": f"{lt['head_images_per_s']:,}",
                "epochs": lt["epochs"],
                "head training s": lt["head_training_s"],
                "cached total s": round(lt["features_s"] + lt["head_training_s"], 1),
                "end to end s": lt["end_to_end_s"],
            }
            for lt in feature_tasks
        ]
        lines += [pd.DataFrame(table).to_markdown(index=False), ""]
    if "sweep" in r:
        lines += [
            "## Predicted 19-task VTAB-1k run (one seed, final protocol)",
            "",
            "Each method's run: every task's train800val200 (1,000 images) for its recipe's epochs, then the "
            "test split. **ours**: splits decoded once into the uint8 cache, the measured training step, the "
            "test split evaluated once at the large batch (the linear probe: features once, then the head). "
            "**official pattern**: fp32, every image decoded every epoch and the whole test split evaluated "
            "after every epoch at the training batch, decoding overlapped with compute (the case most "
            "favourable to it). Per-task token counts (prompt lengths) scale both by the floor at that count. "
            "A grid search multiplies a method's cost by its grid points; a pruning or selection stage adds its "
            "own cost, not predicted here: a decision from a trained model (E²VPT's pruning, NOAH's supernet and "
            "search) a dense run first and one run per candidate, one from the pretrained model (SCT, GPS, SPT) a "
            "pass over train800 per task.",
            "",
        ]
        table = [
            {
                "method": s["method"],
                "tokens": ",".join(map(str, s["tokens"])),
                "ours h": f"{s['ours_s'] / 3600:.2f}",
                "decode / train / eval s": f"{s['ours_decode_s']:.0f} / {s['ours_train_s']:.0f} / {s['ours_eval_s']:.0f}",
                "official h": f"{s['official_s'] / 3600:.2f}",
                "train / eval s": f"{s['official_train_s']:.0f} / {s['official_eval_s']:.0f}",
                "speed-up": f"{s['speedup']:.1f}×",
                "note": s.get("note") or "",
            }
            if s.get("ours_s") is not None
            else {"method": s["method"], "note": s["note"]}
            for s in r["sweep"]
        ]
        predicted = [s for s in r["sweep"] if s.get("ours_s") is not None]
        lines += [pd.DataFrame(table).fillna("-").to_markdown(index=False), ""]
        if predicted:
            lines += [
                f"Decode and resize: {predicted[0]['decode_images_per_s']} images/s; ours uses "
                f"{predicted[0]['ours_variant']}, the official pattern {predicted[0]['official_variant']}.",
                "",
            ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`out/<device>-<backbone>-<date>.json` and `.md`, written atomically."""
    from benchmark.run.results import atomic_write_bytes, write_json

    stem = report_stem(report)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(json_path, report)
    atomic_write_bytes(md_path, markdown(report).encode())
    return json_path, md_path


# -- tables ---------------------------------------------------------------------------------------------
# Item 5 of the performance targets: the most a method may cost over the floor at its token count.
FLOOR_TARGETS = {
    "vpt_shallow": 1.05, "vpt_deep": 1.05, "e2vpt": 1.05, "convpass": 1.05, "convpass_attn": 1.05,
    "lion": 1.5, "pgn": 1.5, "lora": 1.05, "bitfit": 1.05, "ssf": 1.05, "fact_tt": 1.05, "fact_tk": 1.05,
    "repadapter": 1.05, "adapter": 1.05, "adaptformer": 1.05,
}  # fmt: skip


def result_rows(candidates: list[Candidate], batch_size: int) -> list[dict[str, Any]]:
    """One row per method and variant: step time, images/s, ratios to the floor and to full fine-tuning,
    peak memory and its ratio to full fine-tuning's."""
    floors = {(c.variant, c.tokens): c for c in candidates if c.kind == "floor"}
    full = {c.variant: c for c in candidates if c.kind == "method" and c.name == "full" and c.timed}
    rows = []
    for c in candidates:
        if c.kind != "method":
            continue
        if not c.timed:
            rows.append(untimed_row(c))
            continue
        ms = step_ms(c)
        floor = floors[(c.variant, c.tokens)]
        ref = full.get(c.variant)
        target = FLOOR_TARGETS.get(c.name)
        x_floor = ms / step_ms(floor)
        rows.append(
            {
                "method": c.name,
                "variant": c.variant.label,
                "tokens": c.tokens,
                "step_ms": round(ms, 2),
                "images_per_s": round(batch_size * 1000 / ms, 2),
                "floor_ms": round(step_ms(floor), 2),
                "x_floor": round(x_floor, 3),
                "target_x_floor": target,
                "meets_target": None if target is None else bool(x_floor <= target),
                "x_full": round(ms / step_ms(ref), 3) if ref else None,
                "peak_memory_mb": None if c.memory_mb is None else round(c.memory_mb, 1),
                "memory_x_full": (
                    round(c.memory_mb / ref.memory_mb, 3) if ref and c.memory_mb and ref.memory_mb else None
                ),
                "tunable_params": c.params["tunable"] if c.params else None,
                "step_ms_all": [round(1000 * t, 2) for t in c.times],
                "note": c.note,
            }
        )
    return rows


def untimed_row(c: Candidate) -> dict[str, Any]:
    """The row of a method that could not be timed: every measure empty, its note saying why in one line."""
    return {
        "method": c.name,
        "variant": c.variant.label,
        "tokens": None,
        **dict.fromkeys(("step_ms", "images_per_s", "floor_ms", "x_floor", "target_x_floor", "meets_target")),
        **dict.fromkeys(("x_full", "peak_memory_mb", "memory_x_full", "tunable_params")),
        "step_ms_all": [],
        "note": f"untimed: {c.error}",
    }


def floor_rows(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [
        {"variant": c.variant.label, "tokens": c.tokens, "step_ms": round(step_ms(c), 2)}
        for c in candidates
        if c.kind == "floor"
    ]
