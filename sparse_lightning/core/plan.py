"""A method described as data: what it selects, what it does when, and what memory it holds.

Every callback answers :meth:`~sparse_lightning.callbacks.base.MethodCallback.plan` with a :class:`MethodPlan` for a
module and a :class:`Timeline` (the run's length). Training, ``sparse-lightning recipes validate``, ``bench`` and the
recipe loader all read that one description, so a schedule is resolved and checked by one rule
(:meth:`Timeline.window`) with one message, before and during training alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.schedules import TimeSpec


@dataclass(frozen=True)
class Timeline:
    """The length of a run in optimizer steps: ``total_steps`` and ``steps_per_epoch`` (``math.inf`` if unknown)."""

    total_steps: float
    steps_per_epoch: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total_steps)

    def step(self, spec: TimeSpec, name: str) -> int:
        """The optimizer step of one time argument; a ``ConfigError`` naming it when the run's length is unknown."""
        if spec.kind == "steps":
            return int(spec.value)
        if spec.kind == "fraction":
            if not self.finite:
                raise ConfigError(
                    f"`{name}`={spec.text} is a fraction of training, but training has no fixed length "
                    "(a dataloader without a length and no `max_steps`): give it in steps."
                )
            return int(round(spec.value * self.total_steps))
        if not math.isfinite(self.steps_per_epoch):
            raise ConfigError(
                f"`{name}`={spec.text!r} counts epochs, but the training dataloader has no length: give it in steps."
            )
        return int(round(spec.value * self.steps_per_epoch))

    def window(self, start: TimeSpec, end: TimeSpec, every: TimeSpec | None = None) -> tuple[int, int, int]:
        """``(start, end, every)`` in optimizer steps, by the one rule every scheduled method follows.

        ``every`` must resolve to at least one step; ``end`` may be the run's length (``end=1.0``), which means its
        last step, but not beyond it; ``end`` must come after ``start``.
        """
        first, last = self.step(start, "start"), self.step(end, "end")
        period = 1
        if every is not None:
            period = self.step(every, "every")
            if period < 1:
                raise ConfigError(f"`every`={every.text} resolves to {period} steps; it must be at least 1.")
        if self.finite:
            total = int(self.total_steps)
            if last > total:
                raise ConfigError(
                    f"`end`={end.text} is optimizer step {last}, but training has only {total} steps: the schedule "
                    "would never finish."
                )
            last = min(last, total - 1)
        if last <= first:
            raise ConfigError(f"`end`={end.text} (step {last}) must come after `start`={start.text} (step {first}).")
        return first, last, period


def check_window(start: TimeSpec, end: TimeSpec, every: TimeSpec | None = None) -> None:
    """The part of :meth:`Timeline.window` that holds for any run length, for constructors: windows in steps are
    checked whole (same messages), windows of fractions or epochs are compared when both ends are of one kind."""
    if start.kind == end.kind == "steps" and (every is None or every.kind == "steps"):
        Timeline(math.inf, math.inf).window(start, end, every)
    elif start.kind == end.kind and end.value <= start.value:
        raise ConfigError(f"`end`={end.text} must come after `start`={start.text}.")


@dataclass(frozen=True)
class Event:
    """One thing a method does at optimizer step ``step`` (``kind``), aiming at ``target`` sparsity if it sets one."""

    step: int
    kind: str
    target: float | None = None


@dataclass
class MethodPlan:
    """What one callback will do on one module over one run."""

    method: str
    parameters: dict[str, tuple[int, ...]]
    target: float | None
    events: list[Event] = field(default_factory=list)
    memory_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_selected(self) -> int:
        return sum(math.prod(shape) for shape in self.parameters.values())

    def summary(self, max_events: int = 11) -> str:
        """A few lines for people: selection, events (at most ``max_events``, evenly picked) and memory."""
        lines = [f"{self.method}: {len(self.parameters)} parameter(s), {self.num_selected:,} values"]
        for name, shape in self.parameters.items():
            lines.append(f"    {name:40s} {str(shape):>16s} {math.prod(shape):>10d}")
        if self.target is not None:
            lines.append(f"    final sparsity {self.target:g}")
        if self.events:
            shown = self.events
            if len(shown) > max_events:
                picks = sorted({round(i * (len(shown) - 1) / (max_events - 1)) for i in range(max_events)})
                shown = [shown[i] for i in picks]
            lines.append(f"    {len(self.events)} event(s), from step {self.events[0].step} to {self.events[-1].step}:")
            for event in shown:
                target = "" if event.target is None else f"  {event.target:6.3f}  " + "#" * round(40 * event.target)
                lines.append(f"    step {event.step:>7d}  {event.kind:<10s}{target}")
        if self.memory_bytes:
            lines.append(f"    extra memory {self.memory_bytes / 2**20:.1f} MiB")
        lines += [f"    {note}" for note in self.notes]
        return "\n".join(lines)
