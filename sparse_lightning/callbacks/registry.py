"""Method short names for recipes and the command: each method file joins with one line, ``@register("name")``."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl

METHODS: dict[str, type[pl.Callback]] = {}


def register(name: str) -> Callable[[type[pl.Callback]], type[pl.Callback]]:
    def add(cls: type[pl.Callback]) -> type[pl.Callback]:
        if name in METHODS and METHODS[name] is not cls:
            raise RuntimeError(f"Method name {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__}).")
        METHODS[name] = cls
        return cls

    return add
