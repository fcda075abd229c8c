"""`perf`'s report files: the measured report as JSON and as a Markdown page (moved out of `perf_model.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
            "tokens": x["tokens"],
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
        }
        for x in r["rows"]
    ]
    lines += [pd.DataFrame(table).to_markdown(index=False), ""]
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
    if "linear_task" in r:
        lt = r["linear_task"]
        lines += [
            "## Linear probe over one task",
            "",
            f"`{lt['task']}`: features of the {lt['images']:,} train800val200 and test images once "
            f"({lt['features_s']} s at the evaluation throughput), then {lt['epochs']} epochs of the head on "
            f"cached features ({lt['head_images_per_s']:,} images/s: {lt['head_training_s']} s): "
            f"{lt['features_s'] + lt['head_training_s']:.1f} s in all, against {lt['end_to_end_s']} s training "
            "end to end through the frozen backbone.",
            "",
        ]
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
            "A grid search multiplies a method's cost by its grid points; E²VPT's pruning search adds a "
            "dense run and one rewind run per candidate.",
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
            }
            for s in r["sweep"]
        ]
        decode = r["sweep"][0]["decode_images_per_s"] if r["sweep"] else None
        lines += [
            pd.DataFrame(table).to_markdown(index=False),
            "",
            f"Decode and resize: {decode} images/s; ours uses {r['sweep'][0]['ours_variant']}, the official "
            f"pattern {r['sweep'][0]['official_variant']}.",
            "",
        ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`out/<device>-<backbone>-<date>.json` and `.md`, written atomically."""
    from benchmark.results import atomic_write_bytes, write_json

    stem = report_stem(report)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(json_path, report)
    atomic_write_bytes(md_path, markdown(report).encode())
    return json_path, md_path
