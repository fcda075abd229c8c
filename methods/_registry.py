"""Name -> method config class: the built-in methods and those of installed plugins.

Built-in methods register as `methods/__init__.py` imports their modules (`@register_method`). Plugins are the
`peft_bench.methods` entry points of installed distributions (`methods/_plugins.py`); `methods/__init__.py` loads them
right after the built-ins, so that every process importing `methods` (a command, a local worker, a SLURM job, which
unpickles configs whose `name` the registration sets) has the same registry. A lookup loads whatever could not be
loaded then. Imports no method, so method modules can import it freely.
"""

from __future__ import annotations

import logging
import re
import sys
from importlib.metadata import EntryPoint
from types import ModuleType
from typing import TypeVar

from methods import _plugins
from methods._base import MethodConfig

_METHODS: dict[str, type[MethodConfig]] = {}
# Plugin method name -> the distribution providing it (`tinyplug 0.1`); built-in methods have none.
_ORIGINS: dict[str, str] = {}
# Entry point name -> why its plugin was skipped, so that asking for that method says why it is unknown.
_SKIPPED: dict[str, str] = {}
# Entry points not loaded yet; None until discovered (once per process).
_PENDING: list[EntryPoint] | None = None
_LOADING = False
_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
C = TypeVar("C", bound="type[MethodConfig]")
log = logging.getLogger(__name__)


class UnknownMethodError(KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateMethodError(ValueError):
    """A method name registered twice (two modules, or a plugin reusing a built-in name)."""


class PluginError(Exception):
    """Why a plugin entry point cannot be used, and what to do, in one line."""


def register_method(name: str):
    """Class decorator: register a `MethodConfig` subclass under a lower_snake `name`."""
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lower_snake_case")

    def decorator(cls: C) -> C:
        if name in _METHODS:
            owner = _METHODS[name].__qualname__
            owner = f"{owner} of {_ORIGINS[name]}" if name in _ORIGINS else f"the built-in {owner}"
            raise DuplicateMethodError(f"method {name!r} is already registered by {owner}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type[MethodConfig]:
    """The config class registered under `name`."""
    load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        why = f"; {_SKIPPED[name]}" if name in _SKIPPED else ""
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}{why}") from None


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    load_plugins()
    return sorted(_METHODS)


def method_origin(name: str) -> str | None:
    """Where a method not built in comes from: its plugin's distribution (`tinyplug 0.1`), or else the module that
    registered it (`module my_methods`); None for a built-in method."""
    module = get_method(name).__module__
    if name in _ORIGINS or module.split(".")[0] != __name__.split(".")[0]:
        return _ORIGINS.get(name, f"module {module}")
    return None


def load_plugins() -> None:
    """Register the methods of every installed plugin not loaded yet.

    A plugin that cannot be used (it fails to import, reuses a registered name, or points at the wrong kind of
    object) is skipped with a one-line warning naming its distribution and what to do, and registers nothing. A
    warning rather than an error: one broken package in the environment must not stop every command and every
    other method; asking for a skipped method fails as any unknown method does, with the reason appended. Reusing a
    built-in name is never an override: results are filed and compared by method name.
    """
    global _PENDING, _LOADING
    if _LOADING:  # a plugin looking a method up while it is imported: the methods registered so far serve it
        return
    if _PENDING is None:
        _PENDING = _plugins.discovered()
    _LOADING, waiting = True, []
    try:
        while _PENDING:
            ep = _PENDING.pop(0)
            if _plugins.importing(ep):
                waiting.append(ep)
                continue
            before = set(_METHODS)
            try:
                names = _load(ep, before)
            except PluginError as e:
                for name in set(_METHODS) - before:
                    if _METHODS[name].__module__ not in sys.modules:  # its module failed: nothing half-registered
                        del _METHODS[name]
                _SKIPPED[ep.name] = f"the {_plugins.title(ep)} was skipped: {e}"
                log.warning("warning: skipped the %s: %s", _plugins.title(ep), e)
                continue
            _ORIGINS.update(dict.fromkeys(names, _plugins.source(ep)))
    finally:
        _PENDING.extend(waiting)
        _LOADING = False


def _load(ep: EntryPoint, before: set[str]) -> list[str]:
    """Load one entry point; the names of the methods it provides, or `PluginError`."""
    dist = ep.dist.name if ep.dist is not None else "the plugin"
    try:
        obj = ep.load()
    except DuplicateMethodError as e:
        raise PluginError(f"{e}; rename the plugin's method, or uninstall {dist}") from None
    except Exception as e:  # whatever the plugin's own import raises
        problem = f"importing it failed ({type(e).__name__}: {e})"
        raise PluginError(f"{problem}; fix the plugin or install what it needs, or uninstall {dist}") from None
    added = [name for name in _METHODS if name not in before]
    if isinstance(obj, ModuleType):
        # Also the methods of a module imported before this (e.g. by the plugin's own tests): registered already.
        names = added + [n for n, cls in _METHODS.items() if n not in added and _plugins.owns(ep, cls.__module__)]
        if not names:
            raise PluginError(
                f"module {ep.module} registers no method; decorate its MethodConfig subclass with "
                f"@register_method(...), or point the entry point at the class ({ep.module}:ClassName)"
            )
        return names
    if not (isinstance(obj, type) and issubclass(obj, MethodConfig)):
        raise PluginError(
            f"{ep.value} is a {type(obj).__name__}, not a module or a MethodConfig subclass; point the entry point "
            "at the module that registers the method, or at its config class"
        )
    if _METHODS.get(ep.name) is obj:  # a class that registered itself under the same name
        return added if ep.name in added else [*added, ep.name]
    if obj in _METHODS.values():
        raise PluginError(f"{obj.__qualname__} is registered as {obj.name!r}; name the entry point {obj.name!r}")
    try:
        register_method(ep.name)(obj)
    except DuplicateMethodError as e:
        raise PluginError(f"{e}; rename the entry point, or uninstall {dist}") from None
    except ValueError as e:
        raise PluginError(f"{e}; rename the entry point") from None
    return [*added, ep.name]
