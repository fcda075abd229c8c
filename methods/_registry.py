"""Name -> method config class. Imports no method, so method modules can import it freely."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from methods._base import MethodConfig

_METHODS: dict[str, type[MethodConfig]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
C = TypeVar("C", bound="type[MethodConfig]")


class UnknownMethodError(KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_method(name: str):
    """Class decorator: register a `MethodConfig` subclass under a lower_snake `name`."""
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lower_snake_case")

    def decorator(cls: C) -> C:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type[MethodConfig]:
    """The config class registered under `name`."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)
