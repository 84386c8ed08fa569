"""The errors sparse-lightning raises for bad input: subclasses of ``ValueError`` / ``TypeError``.

The command catches them and prints one line (exit status 2) instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """An argument, recipe field or selection that can not be used, with a message naming it."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong type."""


def check_int(name: str, value: int | None, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` if it is an int (not a bool) of at least ``minimum``; otherwise an error naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"`{name}` must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; otherwise an error naming ``name`` and the choices."""
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
    return value  # type: ignore[return-value]
