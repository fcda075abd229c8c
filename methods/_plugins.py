"""Method plugins: the `peft_bench.methods` entry points of installed distributions, and loading one of them.

A distribution adds methods by declaring entry points in its `pyproject.toml`:

    [project.entry-points."peft_bench.methods"]
    tinyplug = "tinyplug"                          # a module: importing it runs its `@register_method` decorators
    tiny_scale = "tinyplug.scale:TinyScaleConfig"  # a `MethodConfig` subclass: registered under the entry point's name

The registry (`methods/_registry.py`) loads them and decides what each adds; this module finds the entry points,
names them and their distributions, and tells whether one's module is being imported right now.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

GROUP = "peft_bench.methods"


def discovered() -> list[EntryPoint]:
    """The group's entry points of every installed distribution, in a stable order (distribution, then name)."""
    return sorted(entry_points(group=GROUP), key=lambda ep: (source(ep), ep.name))


def source(ep: EntryPoint) -> str:
    """The distribution that declares `ep`, as `name version` (`tinyplug 0.1`)."""
    if ep.dist is None:
        return "an unknown distribution"
    return f"{ep.dist.name} {ep.dist.version}"


def title(ep: EntryPoint) -> str:
    """How a message names the entry point: `plugin 'tiny_scale = tinyplug:TinyScaleConfig' of tinyplug 0.1`."""
    return f"method plugin '{ep.name} = {ep.value}' of {source(ep)}"


def importing(ep: EntryPoint) -> bool:
    """Whether the entry point's module, or a package above it, is being imported right now: the plugin imported
    `methods` first thing, and its own names do not exist yet (a class entry point is loaded on a later lookup).
    `__spec__._initializing` is what CPython's import system sets while a module's body runs."""
    parts = ep.module.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def owns(ep: EntryPoint, module: str) -> bool:
    """Whether a class defined in `module` belongs to a module entry point (its module or a submodule of it)."""
    return ep.attr is None and (module == ep.module or module.startswith(ep.module + "."))
