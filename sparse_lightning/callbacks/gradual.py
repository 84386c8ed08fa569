"""Gradual magnitude pruning (Zhu & Gupta 2017) and a constant mask for sparse fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from sparse_lightning.callbacks.base import SparsityCallback, check_fraction, check_pattern_fits, select_overrides
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.distribution import check_distribution, layer_densities, pruned_units
from sparse_lightning.core.errors import ConfigError, ConfigTypeError
from sparse_lightning.core.patterns import parse_pattern
from sparse_lightning.core.plan import Event, Timeline, check_window
from sparse_lightning.core.schedules import TimeSpec, TimeValue, check_curve, is_event, parse_time, sparsity_at


class GradualSchedule:
    """The gradual schedule of Zhu & Gupta 2017, shared by every method that prunes on it.

    Every ``every`` optimizer steps from ``start`` to ``end`` the target follows ``curve`` from
    ``initial_sparsity`` to ``sparsity`` (eq. (1) of the paper for ``"cubic"``); the final target is reached at
    ``end``. A subclass calls :meth:`init_schedule` in its constructor.
    """

    sparsity: float
    last_update_step: int

    def init_schedule(
        self, sparsity: float, initial_sparsity: float, start: TimeValue, end: TimeValue, every: TimeValue, curve: str
    ) -> None:
        self.sparsity = check_fraction("sparsity", sparsity)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.sparsity:
            raise ConfigError(
                f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity}): pruned weights "
                "never return."
            )
        self.start_spec = parse_time(start, "start")
        self.end_spec = parse_time(end, "end")
        self.every_spec = parse_time(every, "every", allow_zero=False)
        check_window(self.start_spec, self.end_spec, self.every_spec)
        self.curve = check_curve(curve)
        self.start_step: int | None = None
        self.end_step: int | None = None
        self.every_steps: int | None = None

    @property
    def current_target(self) -> float | None:
        if self.start_step is None or self.last_update_step < 0:
            return 0.0
        return self.target_at(self.last_update_step)

    def target_at(self, step: int) -> float:
        assert self.start_step is not None and self.end_step is not None
        return sparsity_at(step, self.start_step, self.end_step, self.initial_sparsity, self.sparsity, self.curve)

    @property
    def window(self) -> tuple[TimeSpec, TimeSpec]:
        return self.start_spec, self.end_spec

    def resolve_schedule(self, timeline: Timeline) -> None:
        self.start_step, self.end_step, self.every_steps = timeline.window(
            self.start_spec, self.end_spec, self.every_spec
        )

    def events(self) -> list[Event]:
        assert self.start_step is not None and self.end_step is not None and self.every_steps is not None
        steps = [*range(self.start_step, self.end_step, self.every_steps), self.end_step]
        return [Event(step, "prune", self.target_at(step)) for step in dict.fromkeys(steps)]

    def is_update_step(self, step: int) -> bool:
        assert self.start_step is not None and self.end_step is not None and self.every_steps is not None
        return is_event(step, self.start_step, self.end_step, self.every_steps)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)  # type: ignore[misc]
        if self.end_step is not None and self.last_update_step < self.end_step:
            rank_zero_warn(
                f"Training stopped at step {trainer.global_step}, before `end` (step {self.end_step}): the sparsity "
                f"is {self.current_target:.4f}, not the target {self.sparsity}."
            )


@register("gradual_magnitude")
class GradualMagnitudePruning(GradualSchedule, SparsityCallback):
    """Gradual magnitude pruning: Zhu & Gupta 2017, "To prune, or not to prune" (arXiv:1710.01878).

    Every ``every`` optimizer steps from ``start`` to ``end`` the weights of smallest magnitude are masked so that
    the selected weights reach the target of the schedule, eq. (1) of the paper for the default ``curve="cubic"``:

        s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3

    Pruned weights never return. The update happens in ``on_before_optimizer_step`` of the step whose
    ``trainer.global_step`` is due (after the backward pass, before the optimizer uses the gradient), and the
    final target is reached at step ``end``. Deliberate differences from the paper: the per-layer amounts come from
    ``distribution`` (the paper prunes each layer to the same target, ``"uniform"``), and patterns other than
    unstructured are available.

    Args:
        sparsity: final fraction of zeros over the selected weights, in [0, 1).
        initial_sparsity: sparsity at ``start`` (s_i), in [0, ``sparsity``].
        start, end, every: optimizer steps (int), fractions of training (float) or epochs (``"3ep"``).
        curve: ``cubic``, ``linear``, ``cosine``, ``exponential`` or ``constant``.
        distribution: ``uniform``, ``er``, ``erk`` or ``global``.
        pattern: ``unstructured``, ``"N:M"``, ``"block:RxC"`` or ``channel``.
        include, exclude: parameter-name patterns; see :mod:`sparse_lightning.core.targets`.
        overrides: ``{name pattern: final sparsity}`` for layers that follow their own target; the others are
            solved so the selected weights together still reach ``sparsity``.
        min_density: no layer keeps fewer than this fraction of its weights.
        log_sparsity: log through the shared helper.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[GradualMagnitudePruning(sparsity=0.9, end=0.75, every=50)])
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start: TimeValue = 0,
        end: TimeValue = 0.75,
        every: TimeValue = 100,
        curve: str = "cubic",
        distribution: str = "uniform",
        pattern: str = "unstructured",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        overrides: Mapping[str, float] | None = None,
        min_density: float = 0.0,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.init_schedule(sparsity, initial_sparsity, start, end, every, curve)
        self.distribution = check_distribution(distribution)
        self.pattern = parse_pattern(pattern)
        self.pattern.check_sparsity(self.sparsity)
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigTypeError(f"`overrides` must map parameter-name patterns to sparsities, got {overrides!r}.")
        self.overrides = {str(k): check_fraction(f"overrides[{k!r}]", v) for k, v in (overrides or {}).items()}
        self.min_density = check_fraction("min_density", min_density)
        self._layer_overrides: dict[str, float] = {}

    def validate(self, params: Mapping[str, Tensor]) -> None:
        check_pattern_fits(self.pattern, params)
        self._layer_overrides = select_overrides(list(params), self.overrides)
        for name, value in self._layer_overrides.items():
            if value > self.pattern.max_sparsity + 1e-12:
                raise ConfigError(
                    f"`overrides` give {name!r} sparsity {value}, more than pattern {self.pattern} allows."
                )
        shapes = {n: p.shape for n, p in params.items()}
        if self.distribution != "global":
            floor = {n: 1.0 - self.pattern.max_sparsity for n in shapes}
            fixed = {n: 1.0 - s for n, s in self._layer_overrides.items()}
            layer_densities(shapes, self.sparsity, self.distribution, fixed, self.min_density, floor)
        else:
            total = sum(math.prod(s) for s in shapes.values())
            fixed_kept = sum((1 - s) * math.prod(shapes[n]) for n, s in self._layer_overrides.items())
            if fixed_kept > (1 - self.sparsity) * total + 0.5:
                raise ConfigError(
                    f"`overrides` keep more weights than `sparsity` {self.sparsity} allows over the selected layers."
                )

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = {
            n: params[n].detach().abs().float().masked_fill(~self.mask_set.mask_for(n, params[n]), -math.inf)
            for n in self.names
        }
        return self.select_masks(scores, self.target_at(step), step)

    def select_masks(self, scores: Mapping[str, Tensor], sparsity: float, step: int) -> dict[str, Tensor]:
        """Keep masks that reach ``sparsity`` under the distribution, pattern and overrides (higher score = keep;
        ``-inf`` marks weights that are already pruned)."""
        assert self.start_step is not None and self.end_step is not None
        fixed = {
            n: 1.0 - sparsity_at(step, self.start_step, self.end_step, min(self.initial_sparsity, s), s, self.curve)
            for n, s in self._layer_overrides.items()
        }
        pruned = pruned_units(scores, self.pattern, sparsity, self.distribution, fixed, self.min_density)
        return {n: self.pattern.keep_mask(scores[n], pruned[n]) for n in self.names}


@register("constant_mask")
class ConstantMask(SparsityCallback):
    """Keep the zeros a model already has: sparse fine-tuning after pruning, or training a given sparse model.

    At ``setup`` each selected parameter without a mask gets ``weight != 0`` as its mask (a parameter already
    masked by an earlier method keeps that mask); from then on masked weights, their gradients and optimizer state
    stay exactly zero.

    Args:
        include, exclude: parameter-name patterns; see :mod:`sparse_lightning.core.targets`.
        log_sparsity: log through the shared helper.
    """

    @property
    def current_target(self) -> float | None:
        return self.mask_set.sparsity(self.names) if self._module is not None and self.names else None

    def initial_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: p.detach() != 0 for n, p in params.items()}
