"""When: time arguments and sparsity curves.

Time (``start``, ``end``, ``every``) is given as

- an ``int``: optimizer steps (``trainer.global_step``, so gradient accumulation and several devices count right);
- a ``float`` in (0, 1]: a fraction of the total optimizer steps (``trainer.estimated_stepping_batches``);
- a string ``"Nep"`` (``"3ep"``, ``"0.5ep"``): epochs, times the optimizer steps in one epoch.

Curves map progress ``p = (t - start) / (end - start)`` in [0, 1] to a sparsity between ``initial`` (s_i) and
``final`` (s_f):

- ``cubic`` (Zhu & Gupta 2017, eq. 1): s_t = s_f + (s_i - s_f) (1 - p)^3
- ``inverse_cubic`` (SparseML's): s_t = s_i + (s_f - s_i) (1 - (1 - p)^(1/3)), slow at first, fast at the end
- ``linear``: s_t = s_i + (s_f - s_i) p
- ``cosine``: s_t = s_f + (s_i - s_f) (1 + cos(pi p)) / 2
- ``exponential``: density decays geometrically, (1 - s_t) = (1 - s_i) ((1 - s_f) / (1 - s_i))^p, so every equally
  spaced event removes the same fraction of what is left (what compounding ``amount`` pruning does)
- ``constant``: s_f from ``start`` on
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sparse_lightning.core.errors import ConfigError, ConfigTypeError

TimeValue = int | float | str

_EPOCHS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*ep\s*$")


@dataclass(frozen=True)
class TimeSpec:
    """A parsed time argument; ``resolve`` turns it into an optimizer step."""

    kind: Literal["steps", "fraction", "epochs"]
    value: float
    text: str

    def resolve(self, total_steps: int, steps_per_epoch: int) -> int:
        if self.kind == "steps":
            return int(self.value)
        if self.kind == "fraction":
            return int(round(self.value * total_steps))
        return int(round(self.value * steps_per_epoch))


def parse_time(value: TimeValue, name: str, allow_zero: bool = True) -> TimeSpec:
    """Parse one time argument, raising ``ValueError`` that names the argument and the allowed forms."""
    allowed = "an int (optimizer steps), a float in (0, 1] (fraction of training) or a string like '3ep' (epochs)"
    if isinstance(value, bool):
        raise ConfigTypeError(f"`{name}` must be {allowed}, got {value!r}.")
    if isinstance(value, int):
        if value < 0 or (value == 0 and not allow_zero):
            low = ">= 0" if allow_zero else ">= 1"
            raise ConfigError(f"`{name}` must be {low} when given in steps, got {value}.")
        return TimeSpec("steps", float(value), str(value))
    if isinstance(value, float):
        if not 0.0 < value <= 1.0 and not (allow_zero and value == 0.0):
            raise ConfigError(f"`{name}` as a float is a fraction of training and must lie in (0, 1], got {value}.")
        return TimeSpec("fraction", value, str(value))
    if isinstance(value, str):
        match = _EPOCHS.match(value)
        if match is None:
            raise ConfigError(f"`{name}` must be {allowed}; could not parse {value!r}.")
        epochs = float(match.group(1))
        if epochs == 0 and not allow_zero:
            raise ConfigError(f"`{name}` must be more than 0 epochs, got {value!r}.")
        return TimeSpec("epochs", epochs, value.strip())
    raise ConfigTypeError(f"`{name}` must be {allowed}, got {value!r} of type {type(value).__name__}.")


def _cubic(p: float, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1.0 - p) ** 3


def _inverse_cubic(p: float, s_i: float, s_f: float) -> float:
    return s_i + (s_f - s_i) * (1.0 - (1.0 - p) ** (1.0 / 3.0))


def _linear(p: float, s_i: float, s_f: float) -> float:
    return s_i + (s_f - s_i) * p


def _cosine(p: float, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * 0.5 * (1.0 + math.cos(math.pi * p))


def _exponential(p: float, s_i: float, s_f: float) -> float:
    return 1.0 - (1.0 - s_i) * ((1.0 - s_f) / (1.0 - s_i)) ** p


def _constant(p: float, s_i: float, s_f: float) -> float:
    return s_f


CURVES: dict[str, Callable[[float, float, float], float]] = {
    "cubic": _cubic,
    "inverse_cubic": _inverse_cubic,
    "linear": _linear,
    "cosine": _cosine,
    "exponential": _exponential,
    "constant": _constant,
}


def check_curve(curve: str) -> str:
    if curve not in CURVES:
        raise ConfigError(f"`curve` must be one of {sorted(CURVES)}, got {curve!r}.")
    return curve


def sparsity_at(step: int, start: int, end: int, initial: float, final: float, curve: str = "cubic") -> float:
    """Target sparsity at optimizer step ``step``.

    Before ``start`` nothing is pruned (0.0); from ``start`` to ``end`` the curve runs from ``initial`` to
    ``final``; after ``end`` it stays at ``final``.
    """
    if step < start:
        return 0.0
    if end <= start:
        return final
    p = min(1.0, (step - start) / (end - start))
    return CURVES[check_curve(curve)](p, initial, final)


def is_event(step: int, start: int, end: int, every: int) -> bool:
    """Whether a mask update is due at ``step``: ``start``, every ``every`` steps after it, and ``end`` itself."""
    if step < start or step > end:
        return False
    return (step - start) % every == 0 or step == end


def next_event(step: int, start: int, end: int, every: int) -> int | None:
    """The first event of :func:`is_event` at or after ``step`` (``None`` once ``end`` has passed)."""
    if step > end:
        return None
    if step <= start:
        return start
    candidate = start + -(-(step - start) // every) * every
    return min(candidate, end)
