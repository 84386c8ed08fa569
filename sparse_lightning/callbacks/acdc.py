"""AC/DC: alternating compressed and decompressed training (Peste, Iofinova, Vladu & Alistarh, NeurIPS 2021)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from sparse_lightning.callbacks.base import SparsityCallback, check_fraction, check_pattern_fits
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.distribution import check_distribution, pruned_units
from sparse_lightning.core.errors import ConfigTypeError
from sparse_lightning.core.patterns import parse_pattern
from sparse_lightning.core.plan import Event, Timeline, check_window
from sparse_lightning.core.schedules import TimeSpec, TimeValue, parse_time

MOMENTUM_STATES = ("momentum_buffer", "exp_avg")


@register("acdc")
class ACDC(SparsityCallback):
    """AC/DC: Peste, Iofinova, Vladu & Alistarh, "AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural
    Networks" (NeurIPS 2021).

    Dense warm-up until ``start``; then phases of length ``phase`` alternate, compressed first: at the start of each
    compressed (sparse) phase the selected weights are ranked by magnitude, globally by default, and all but the
    top 1 - ``sparsity`` are masked for the whole phase; at the start of each decompressed (dense) phase every mask
    is lifted, the pruned weights restart from 0, and the optimizer's momentum is reset to 0 (``momentum_buffer``
    of SGD, ``exp_avg`` of Adam; the paper: stale momentum of re-introduced weights hurts). From ``end`` to the end
    of training one last compressed phase: the run ends sparse, as the paper's. A compressed phase that follows
    another (the last alternating phase before ``end``) keeps its mask.

    Defaults are the paper's ImageNet schedule in fractions of training: 100 epochs, dense warm-up of 10
    (``start=0.1``), phases of 5 (``phase=0.05``), the final compressed phase the last 10 (``end=0.9``).

    Args:
        sparsity: fraction of zeros over the selected weights in every compressed phase, in [0, 1).
        start: end of the dense warm-up (the first compressed phase begins).
        end: beginning of the final compressed phase, which lasts to the end of training.
        phase: length of each alternating phase.
        distribution: ``global`` (the paper's global magnitude top-k), ``uniform``, ``er`` or ``erk``.
        pattern: ``unstructured``, ``"N:M"``, ``"block:RxC"`` or ``channel``.
        reset_momentum: zero the optimizer's momentum at the start of each decompressed phase.
        include, exclude, log_sparsity: as every method.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        start: TimeValue = 0.1,
        end: TimeValue = 0.9,
        phase: TimeValue = 0.05,
        distribution: str = "global",
        pattern: str = "unstructured",
        reset_momentum: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.sparsity = check_fraction("sparsity", sparsity)
        self.start_spec: TimeSpec = parse_time(start, "start")
        self.end_spec: TimeSpec = parse_time(end, "end")
        self.phase_spec: TimeSpec = parse_time(phase, "phase", allow_zero=False)
        check_window(self.start_spec, self.end_spec, self.phase_spec)
        self.distribution = check_distribution(distribution)
        self.pattern = parse_pattern(pattern)
        self.pattern.check_sparsity(self.sparsity)
        if not isinstance(reset_momentum, bool):
            raise ConfigTypeError(f"`reset_momentum` must be a bool, got {reset_momentum!r}.")
        self.reset_momentum = reset_momentum
        self.start_step: int | None = None
        self.end_step: int | None = None
        self.phase_steps: int | None = None

    @property
    def window(self) -> tuple[TimeSpec, TimeSpec]:
        return self.start_spec, self.end_spec

    def validate(self, params: Mapping[str, Tensor]) -> None:
        check_pattern_fits(self.pattern, params)

    def resolve_schedule(self, timeline: Timeline) -> None:
        self.start_step, self.end_step, self.phase_steps = timeline.window(
            self.start_spec, self.end_spec, self.phase_spec
        )

    def compressed(self, step: int) -> bool:
        """Whether optimizer step ``step`` lies in a compressed (sparse) phase."""
        assert self.start_step is not None and self.end_step is not None and self.phase_steps is not None
        if step < self.start_step:
            return False
        if step >= self.end_step:
            return True
        return (step - self.start_step) // self.phase_steps % 2 == 0

    def is_update_step(self, step: int) -> bool:
        assert self.start_step is not None
        return step >= self.start_step and (
            step == self.start_step or self.compressed(step) != self.compressed(step - 1)
        )

    def events(self) -> list[Event]:
        assert self.start_step is not None and self.end_step is not None and self.phase_steps is not None
        steps = [s for s in range(self.start_step, self.end_step + 1) if self.is_update_step(s)]
        return [
            Event(s, "compress" if self.compressed(s) else "decompress", self.sparsity if self.compressed(s) else 0.0)
            for s in steps
        ]

    @property
    def current_target(self) -> float | None:
        if self.start_step is None or self.last_update_step < 0:
            return 0.0
        return self.sparsity if self.compressed(self.last_update_step) else 0.0

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.compressed(step):
            return {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.names}
        scores = {n: params[n].detach().abs().float() for n in self.names}
        pruned = pruned_units(scores, self.pattern, self.sparsity, self.distribution)
        return {n: self.pattern.keep_mask(scores[n], pruned[n]) for n in self.names}

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        super().update_masks(trainer, pl_module, step)
        if self.reset_momentum and not self.compressed(step):
            for optimizer in trainer.optimizers:
                for state in optimizer.state.values():
                    for key in MOMENTUM_STATES:
                        if isinstance(state.get(key), Tensor):
                            state[key].zero_()
