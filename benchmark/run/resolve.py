"""One resolution of a run's configuration, shared by every command that trains, plans, counts or rebuilds runs
(`run`, `bench` and its workers, `reproduce`, `params`, `perf`, `export`).

A run's method config is, in this order:

1. the method's defaults (or the config a command starts from);
2. its per-task settings (`MethodConfig.for_task`), unless `per_task` is false, by default or by the user's option;
3. the user's options (`--set key=value`), which always win, also over per-task values;
4. the recipe overrides: the command line's (`--lr`, `--epochs`, ...), then the task's own (e.g. `reproduce`'s
   learning-rate grid scaled to the task's batch size).

Its backbone is built from that config's `backbone_kwargs()` (e.g. its drop-path rate): `Backbones` builds one per
distinct arguments, so a sweep whose tasks share them builds one. A result records the resolved config
(`MethodConfig.to_dict`); `config_from_record` and `settings_from_record` read it back, and the same `build_backbone`
rebuilds its backbone, so a rebuilt run cannot disagree with the one that trained.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from benchmark.core.errors import UserError
from benchmark.run.backbone import create_backbone
from benchmark.run.runner import Settings
from methods import MethodConfig, UnknownMethodError, get_method


def resolve_config(
    method: MethodConfig | type[MethodConfig],
    task_id: str,
    options: dict[str, str] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    task_recipe: dict[str, Any] | None = None,
) -> MethodConfig:
    """The config of `method` (a config class: its defaults; or a config to start from) for a run on `task_id`.

    Args:
        options: the user's `--set` options, as text.
        recipe_overrides: recipe fields set for every task (None values are ignored).
        task_recipe: recipe fields set for this task, on top of `recipe_overrides`.

    Raises:
        UserError: an unknown option or a value the method refuses, in one line naming the method and task.
    """
    config = method() if isinstance(method, type) else method
    options = dict(options or {})
    try:
        if "per_task" in options:  # the user's switch decides whether the per-task settings apply at all
            config = config.with_options({"per_task": options["per_task"]})
        config = config.for_task(task_id).with_options(options)
        return config.with_recipe(**(recipe_overrides or {})).with_recipe(**(task_recipe or {}))
    except ValueError as e:
        raise UserError(f"{config.name} on {task_id}: {e}") from None


def build_backbone(config: MethodConfig, settings: Settings, **kwargs: Any) -> VisionTransformer:
    """The backbone of a run of `config` under `settings` (`kwargs`: `create_backbone`'s, e.g. `device`)."""
    return create_backbone(settings.backbone, pretrained=settings.pretrained, weights=settings.weights,
                           image_size=settings.image_size, **kwargs, **config.backbone_kwargs())  # fmt: skip


class Backbones:
    """The backbones of a sweep's runs: one per distinct `backbone_kwargs()`, built on first use and kept.

    Runs deep-copy the backbone they get (`runner.execute`), so one instance serves every run that shares it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.built: dict[str, VisionTransformer] = {}

    def __call__(self, config: MethodConfig) -> VisionTransformer:
        key = json.dumps(config.backbone_kwargs(), sort_keys=True)
        if key not in self.built:
            self.built[key] = build_backbone(config, self.settings)
        return self.built[key]


def config_from_record(record: dict[str, Any]) -> MethodConfig:
    """The resolved config a result records (`record["config"]["method_config"]`), as the run trained it."""
    try:
        return get_method(record["method"]).from_dict(record["config"]["method_config"])
    except UnknownMethodError as e:
        raise UserError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the result's configuration cannot be read ({type(e).__name__}: {e})") from None


def settings_from_record(record: dict[str, Any]) -> Settings:
    """The run settings a result records (`record["config"]`; fields it predates take their defaults)."""
    config = record.get("config") or {}
    names = {f.name for f in dataclasses.fields(Settings)}
    try:
        return Settings(**{k: v for k, v in config.items() if k in names})
    except TypeError as e:
        raise UserError(f"the result's settings cannot be read ({e})") from None
