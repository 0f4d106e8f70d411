"""Option values as their declared types: what a YAML file or the command line gives, converted where it is
read, and the error that names the option (and its file) when it cannot be."""

from __future__ import annotations

import math
from typing import Literal, get_origin


class ConfigError(ValueError):
    """An option whose value cannot be used; says where the value came from once that is known."""

    def __init__(self, option: str, problem: str, source: str | None = None) -> None:
        self.option, self.problem, self.source = option, problem, source
        where = f"{source}: {option}:" if source else f"--{option}"
        super().__init__(f"{where} {problem}")


def convert(option: str, hint, value):
    """`value` (from YAML or the command line) as the type `hint`, or a ConfigError naming `option`."""
    optional = type(None) in getattr(hint, "__args__", ())
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(option, "may not be null")
    if is_list(hint):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(option, f"expected a path or a list of paths, got {value!r}")
        return items
    base = value_type(hint)
    try:
        converted = _SCALARS[base](value)
    except (TypeError, ValueError):
        raise ConfigError(option, f"expected {_NAMES[base]}, got {value!r}") from None
    if base is not float or math.isfinite(converted):
        return converted
    raise ConfigError(option, f"expected a finite number, got {value!r}")  # inf, nan pass any range check; not JSON


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(value)


def _to_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(value)
    return int(value)


def _to_float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _to_str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def value_type(hint) -> type:
    """The Python type of the values of `hint`: Optional taken off, a Literal's values' type."""
    args = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
    return type(args[0]) if get_origin(hint) is Literal else args[0]


def is_list(hint) -> bool:
    return hint is list or getattr(hint, "__origin__", None) is list
