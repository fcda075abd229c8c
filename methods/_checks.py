"""Checks of method-config fields: each failure is a `ValueError` whose one line says what is wrong and what
to set instead (the field's default where that is valid, or a value the check computes).

Configs call them from `__post_init__` (a field on its own, or fields together) and from `check_backbone`
(fields against the backbone), so that an impossible module is refused when the command starts, not by a
run that fails later.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import MISSING, fields
from typing import Any


def default_of(config: Any, name: str) -> Any:
    """The declared default of field `name` (None when it has none)."""
    for f in fields(config):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not MISSING else None
    raise KeyError(name)


def invalid(config: Any, name: str, problem: str, suggestion: Any = MISSING) -> ValueError:
    """The error for field `name`: `name=value problem; set name=suggestion` (by default: the field's default)."""
    value = getattr(config, name)
    hint = default_of(config, name) if suggestion is MISSING else suggestion
    return ValueError(f"{name}={value!r} {problem}; set {name}={hint!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(
    config: Any, name: str, low: int, high: int | None = None, *, none_ok: bool = False, high_is: str | None = None
) -> None:
    """Field `name` is an integer in [low, high] (None allowed with `none_ok`); `high_is` names the field that sets
    `high`, if one does."""
    value = getattr(config, name)
    if value is None and none_ok:
        return
    if not _is_int(value):
        raise invalid(config, name, "must be an integer" + (" or None" if none_ok else ""))
    if value < low:
        raise invalid(config, name, f"must be at least {low}")
    if high is not None and value > high:
        raise invalid(config, name, f"must be at most {high_is + '=' if high_is else ''}{high}", high)


def real(
    config: Any, name: str, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False,
) -> None:  # fmt: skip
    """Field `name` is a finite number within the bounds (open or closed at each end)."""
    value = getattr(config, name)
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise invalid(config, name, "must be a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = (
            f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        )
        raise invalid(config, name, f"must be in {interval}")


def rates(config: Any, *names: str) -> None:
    """Each named field is a drop rate (dropout, drop-path): a finite number in [0, 1)."""
    for name in names:
        real(config, name, 0.0, 1.0, high_open=True)


def choice(config: Any, name: str, allowed: tuple[Any, ...]) -> None:
    """Field `name` holds one of `allowed`."""
    if getattr(config, name) not in allowed:
        raise invalid(config, name, f"is not one of {', '.join(map(str, allowed))}")


def divisor(config: Any, name: str, total: int, what: str) -> None:
    """Field `name` divides `total` (e.g. the backbone's width); the suggestion is the divisor nearest the default."""
    value = getattr(config, name)
    if total % value:
        default = default_of(config, name)
        near = min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: (abs(d - default), -d))
        raise invalid(config, name, f"does not divide {what} {total}", near)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, resolved once per class: every config's construction checks its fields by
    them, and resolving string annotations costs milliseconds (a protocol plan builds thousands of configs).
    Callers must not modify the dict."""
    return typing.get_type_hints(cls)


def field_types(config: Any) -> None:
    """Every field holds a value of its annotated type (bool, int, float, str, None, or a dataclass)."""
    hints = type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not any(_has_type(value, t) for t in allowed):
            names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            raise invalid(config, f.name, f"must be {names}")


def _has_type(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # generic annotations (tuples, dicts): left to the config's own checks


def parse_option(key: str, text: str, hint: Any) -> Any:
    """Convert `text` to a config field's type (bool, int, float, str, or one of them or None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and text.lower() == "none":
        return None
    target = args[0] if args else hint
    if target is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"option {key} takes true or false, got {text!r}")
    if target in (int, float, str):
        try:
            return target(text)
        except ValueError:
            raise ValueError(f"option {key} takes a {target.__name__}, got {text!r}") from None
    raise ValueError(f"option {key} cannot be set from the command line")
