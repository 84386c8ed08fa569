"""Learning-rate and weight-decay schedules set on the optimizers step by step, as SparseML's recipes drove them.

Sparse recipes are tuned together with their learning-rate schedule; these callbacks carry a SparseML recipe's
``LearningRateFunctionModifier``, ``SetLearningRateModifier``, ``LearningRateModifier`` and
``SetWeightDecayModifier`` over (``sparse-lightning recipes import-sparseml``), and work in any recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn

from sparse_lightning.callbacks.base import MethodCallback, timeline_of
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_choice
from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeSpec, TimeValue, parse_time

FUNCTIONS = ("linear", "cosine", "cyclic_linear", "constant", "step", "multistep", "exponential")


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return float(value)


def _param_groups(value: Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not all(isinstance(i, int) and i >= 0 for i in value):
        raise ConfigTypeError(f"`param_groups` must be a list of parameter-group indices, got {value!r}.")
    return list(value)


def _set(trainer: pl.Trainer, key: str, value: float, groups: list[int] | None, owner: str) -> None:
    for optimizer in trainer.optimizers:
        indices = range(len(optimizer.param_groups)) if groups is None else groups
        for i in indices:
            if i >= len(optimizer.param_groups):
                raise ConfigError(
                    f"{owner}: `param_groups` names group {i}, but the optimizer has {len(optimizer.param_groups)}."
                )
            optimizer.param_groups[i][key] = value


@register("lr_function")
class LearningRateFunction(MethodCallback):
    """Set the learning rate of every optimizer (or of ``param_groups``) at each optimizer step from ``start`` until
    ``end`` (default: the end of training), as a function of the time t in [0, 1] elapsed in that window:

    - ``linear``: init + (final - init) t; ``cosine``: final + (init - final) (1 + cos(pi t)) / 2;
    - ``cyclic_linear``: ``linear`` restarted every ``cycle``;
    - ``constant``: init;
    - ``step``: init gamma^floor(elapsed / ``step_size``); ``exponential``: the same with ``step_size`` one epoch;
    - ``multistep``: init gamma^(number of ``milestones`` passed).

    Times are optimizer steps (int), fractions of training (float) or epochs (``"3ep"``), as every method's. Outside
    the window the learning rate is left as it is (the last value set stays); the callback sets it in
    ``on_train_batch_start``, so it overrides a scheduler of the module's within the window. It holds no state:
    the rate is a function of ``trainer.global_step``, so a resumed run continues the same schedule.

    Args:
        function: one of the above.
        init_lr: the rate at ``start``.
        final_lr: the rate at ``end`` (``linear``, ``cosine``, ``cyclic_linear``).
        start, end: the window (``end=None``: to the end of training).
        cycle: the cycle length of ``cyclic_linear``.
        step_size, gamma, milestones: of ``step``, ``exponential`` and ``multistep``.
        param_groups: indices of the parameter groups to set (default: all).
    """

    def __init__(
        self,
        function: str = "constant",
        *,
        init_lr: float = 0.1,
        final_lr: float | None = None,
        start: TimeValue = 0,
        end: TimeValue | None = None,
        cycle: TimeValue | None = None,
        step_size: TimeValue | None = None,
        gamma: float = 0.1,
        milestones: Sequence[TimeValue] | None = None,
        param_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.function = check_choice("function", function, FUNCTIONS)
        self.init_lr = _positive("init_lr", init_lr, allow_zero=True)
        needs_final = function in ("linear", "cosine", "cyclic_linear")
        if needs_final and final_lr is None:
            raise ConfigError(f"function={function!r} needs `final_lr`.")
        self.final_lr = _positive("final_lr", final_lr, allow_zero=True) if final_lr is not None else None
        self.start_spec: TimeSpec = parse_time(start, "start")
        self.end_spec: TimeSpec | None = parse_time(end, "end") if end is not None else None
        if function == "cyclic_linear" and cycle is None:
            raise ConfigError("function='cyclic_linear' needs `cycle`.")
        self.cycle_spec = parse_time(cycle, "cycle", allow_zero=False) if cycle is not None else None
        if function == "step" and step_size is None:
            raise ConfigError("function='step' needs `step_size`.")
        size = step_size if step_size is not None else ("1ep" if function == "exponential" else None)
        self.step_spec = parse_time(size, "step_size", allow_zero=False) if size is not None else None
        self.gamma = _positive("gamma", gamma)
        if function == "multistep" and not milestones:
            raise ConfigError("function='multistep' needs `milestones`.")
        self.milestone_specs = [parse_time(m, "milestones") for m in milestones or []]
        self.param_groups = _param_groups(param_groups)
        self._steps: dict[str, Any] = {}

    def resolve(self, timeline: Timeline) -> None:
        """Turn the time arguments into optimizer steps for a run of ``timeline``."""
        start = timeline.step(self.start_spec, "start")
        end = timeline.step(self.end_spec, "end") if self.end_spec is not None else None
        if end is None and not timeline.finite:
            raise ConfigError(f"LearningRateFunction({self.function!r}) without `end` needs a run of known length.")
        end = int(timeline.total_steps) if end is None else end
        if end <= start:
            raise ConfigError(f"`end` (step {end}) must come after `start` (step {start}).")
        self._steps = {
            "start": start,
            "end": end,
            "cycle": timeline.step(self.cycle_spec, "cycle") if self.cycle_spec else None,
            "step_size": timeline.step(self.step_spec, "step_size") if self.step_spec else None,
            "milestones": [timeline.step(m, "milestones") for m in self.milestone_specs],
        }
        for key in ("cycle", "step_size"):
            if self._steps[key] is not None and self._steps[key] < 1:
                raise ConfigError(f"`{key}` resolves to {self._steps[key]} steps; it must be at least 1.")

    def rate_at(self, step: int) -> float | None:
        """The learning rate at optimizer step ``step`` (``None`` outside the window)."""
        s = self._steps
        if not s["start"] <= step < s["end"]:
            return None
        elapsed = step - s["start"]
        init, final = self.init_lr, self.final_lr
        if self.function == "constant":
            return init
        if self.function in ("step", "exponential"):
            return init * self.gamma ** (elapsed // s["step_size"])
        if self.function == "multistep":
            return init * self.gamma ** sum(step >= m for m in s["milestones"])
        period = s["cycle"] if self.function == "cyclic_linear" else s["end"] - s["start"]
        t = (elapsed % period) / period
        assert final is not None
        if self.function == "cosine":
            return final + (init - final) * (1 + math.cos(math.pi * t)) / 2
        return init + (final - init) * t

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        self.resolve(timeline)
        s = self._steps
        return MethodPlan(
            method=type(self).__name__,
            parameters={},
            target=None,
            notes=[f"learning rate {self.function} from step {s['start']} to {s['end']}, {self.init_lr:g} at start"],
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve(timeline_of(trainer))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        rate = self.rate_at(trainer.global_step)
        if rate is not None:
            _set(trainer, "lr", rate, self.param_groups, type(self).__name__)


@register("weight_decay")
class SetWeightDecay(MethodCallback):
    """Set the optimizers' ``weight_decay`` (of every parameter group, or of ``param_groups``) from ``start`` on, as
    SparseML's ``SetWeightDecayModifier``; before ``start`` the optimizer's own value applies.

    Args:
        weight_decay: the new value (>= 0).
        start: when (optimizer steps, fraction of training or ``"3ep"``).
        param_groups: indices of the parameter groups to set (default: all).
    """

    def __init__(
        self, weight_decay: float = 0.0, *, start: TimeValue = 0, param_groups: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.start_spec = parse_time(start, "start")
        self.param_groups = _param_groups(param_groups)
        self._start: int | None = None

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        step = timeline.step(self.start_spec, "start")
        return MethodPlan(type(self).__name__, {}, None, notes=[f"weight decay {self.weight_decay:g} from step {step}"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = timeline_of(trainer).step(self.start_spec, "start")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._start is not None and trainer.global_step >= self._start:
            _set(trainer, "weight_decay", self.weight_decay, self.param_groups, type(self).__name__)
