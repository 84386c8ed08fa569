"""GaP: scheduled grow-and-prune (Ma et al. 2022), the cyclic variant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sparse_lightning.callbacks.base import SparsityCallback, check_fraction
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.distribution import check_distribution, random_masks, smallest
from sparse_lightning.core.errors import ConfigError, check_int
from sparse_lightning.core.plan import Event, Timeline
from sparse_lightning.core.schedules import TimeValue, parse_time


@register("gap")
class GaP(SparsityCallback):
    """Cyclic GaP: Ma et al. 2022, "Effective Model Sparsification by Scheduled Grow-and-Prune Methods" (ICLR).

    The selected layers are split into ``parts`` partitions, cyclically in ``named_parameters()`` order (layer i
    joins part i mod K). Training starts from a random mask at ``sparsity`` (per-layer densities from
    ``distribution``). From ``start``, each phase of ``phase`` length grows one part to dense (its masked weights
    come back at zero, with zero optimizer state) while the part grown in the previous phase is magnitude-pruned
    back to its layers' targets; after ``cycles`` x ``parts`` phases the last grown part is pruned and the model is
    sparse everywhere, with the mask fixed for the rest of training. Every re-prune keeps each layer's count of the
    initial mask, so the target is met to the element.

    Deliberate difference: the paper grows and prunes whole partitions of a pre-defined model split (for example
    blocks of a ResNet); here the split is cyclic over the selected parameters, which needs no model knowledge.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        parts: int = 4,
        phase: TimeValue = "1ep",
        cycles: int = 1,
        start: TimeValue = 0,
        distribution: str = "uniform",
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.sparsity = check_fraction("sparsity", sparsity)
        for name, value in (("parts", parts), ("cycles", cycles), ("seed", seed)):
            check_int(name, value)
        if parts < 1 or cycles < 1:
            raise ConfigError(f"`parts` and `cycles` must be at least 1, got parts={parts}, cycles={cycles}.")
        self.parts, self.cycles, self.seed = parts, cycles, seed
        self.distribution = check_distribution(distribution)
        self.phase_spec = parse_time(phase, "phase", allow_zero=False)
        self.start_spec = parse_time(start, "start")
        self.start_step = self.phase_steps = None
        self.add_state("generator", torch.Generator().manual_seed(seed))
        self.add_state("prune_counts", {})

    @property
    def current_target(self) -> float | None:
        return self.sparsity

    @property
    def num_phases(self) -> int:
        return self.parts * self.cycles

    def part_of(self, name: str) -> int:
        return self.names.index(name) % self.parts

    def validate(self, params: Mapping[str, Tensor]) -> None:
        if self.parts > len(params):
            raise ConfigError(f"`parts`={self.parts} is more than the {len(params)} selected parameters.")

    def initial_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.generator.manual_seed(self.seed)
        shapes = {n: p.shape for n, p in params.items()}
        masks = random_masks(shapes, self.sparsity, self.distribution, self.generator)
        self.prune_counts = {n: int((~m).sum()) for n, m in masks.items()}
        return masks

    def resolve_schedule(self, timeline: Timeline) -> None:
        start = timeline.step(self.start_spec, "start")
        phase = timeline.step(self.phase_spec, "phase")
        if phase < 1:
            raise ConfigError(f"`phase`={self.phase_spec.text} resolves to {phase} steps; it must be at least 1.")
        last = start + self.num_phases * phase
        if timeline.finite and last >= timeline.total_steps:
            raise ConfigError(
                f"{self.num_phases} phases of {phase} steps from step {start} end at step {last}, but training has "
                f"only {int(timeline.total_steps)} steps: lower `parts`, `cycles` or `phase`."
            )
        self.start_step, self.phase_steps = start, phase

    def events(self) -> list[Event]:
        assert self.start_step is not None and self.phase_steps is not None
        kinds = ["grow", *["prune/grow"] * (self.num_phases - 1), "prune"]
        return [Event(self.start_step + j * self.phase_steps, kind, self.sparsity) for j, kind in enumerate(kinds)]

    def is_update_step(self, step: int) -> bool:
        assert self.start_step is not None and self.phase_steps is not None
        offset = step - self.start_step
        return offset >= 0 and offset % self.phase_steps == 0 and offset // self.phase_steps <= self.num_phases

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self.start_step is not None and self.phase_steps is not None
        j = (step - self.start_step) // self.phase_steps
        new_masks = {}
        for name in self.names:
            part, mask = self.part_of(name), self.mask_set.mask_for(name, params[name])
            if j < self.num_phases and part == j % self.parts:
                new_masks[name] = torch.ones_like(mask)
            elif j >= 1 and part == (j - 1) % self.parts:
                magnitude = params[name].detach().abs().flatten().float()
                new_masks[name] = ~smallest(magnitude, self.prune_counts[name]).view_as(mask)
        return new_masks
