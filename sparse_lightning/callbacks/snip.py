"""SNIP: single-shot pruning at initialization (Lee et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from sparse_lightning.callbacks.base import SparsityCallback, check_fraction, skip_optimizer_step
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.distribution import check_distribution, pruned_units
from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.patterns import parse_pattern
from sparse_lightning.core.plan import Event, Timeline


@register("snip")
class SNIP(SparsityCallback):
    """SNIP: Lee, Ajanthan & Torr 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity".

    The connection sensitivity of weight j is |dL/dc_j| at c = 1 for the mask c, which equals |g_j * w_j| with g the
    gradient of the loss with respect to the weight. It is computed from the summed gradients of the first
    ``batches`` optimizer steps (default 1) at initialization, with any existing mask applied; the ``sparsity``
    fraction of lowest sensitivity is removed by one global ranking (``distribution="global"``, as in the paper), and
    the mask stays fixed for the rest of training.

    Inside Lightning the gradients come from the ordinary training steps: with ``batches=1`` the mask is computed in
    ``on_before_optimizer_step`` of step 0, before the first update, which then uses the masked gradient. With more
    batches the optimizer steps 0 .. batches-2 are skipped (their gradients are set to ``None``) so the weights stay
    at initialization while gradients are summed; under gradient accumulation one "batch" is one optimizer step.
    Under DDP the gradients are already averaged over ranks, so every rank scores the same.
    """

    scores_gradients = True

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        batches: int = 1,
        distribution: str = "global",
        pattern: str = "unstructured",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.sparsity = check_fraction("sparsity", sparsity)
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ConfigError(f"`batches` must be an int >= 1, got {batches!r}.")
        self.batches = batches
        self.distribution = check_distribution(distribution)
        self.pattern = parse_pattern(pattern)
        self.add_state("grad_sums", {})
        self.add_state("done", False)

    @property
    def current_target(self) -> float | None:
        return self.sparsity if self.done else 0.0

    def validate(self, params: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            self.pattern.check(name, p.shape)

    def resolve_schedule(self, timeline: Timeline) -> None:
        if timeline.finite and self.batches > timeline.total_steps:
            raise ConfigError(
                f"`batches`={self.batches} is more than the {int(timeline.total_steps)} optimizer steps of training."
            )

    def events(self) -> list[Event]:
        return [Event(self.batches - 1, "prune", self.sparsity)]

    def is_update_step(self, step: int) -> bool:
        return not self.done and step < self.batches

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        params = self.params()
        for name in self.names:
            grad = params[name].grad
            if grad is None:
                raise ConfigError(f"SNIP needs the gradient of {name!r}, but it has none (is it frozen?).")
            self.grad_sums[name] = self.grad_sums.get(name, torch.zeros_like(grad)) + grad.detach()
        if step + 1 < self.batches:
            skip_optimizer_step(trainer)
            self.last_update_step = step
            return
        super().update_masks(trainer, pl_module, step)
        self.done, self.grad_sums = True, {}

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = {}
        for name in self.names:
            mask = self.mask_set.mask_for(name, params[name])
            sensitivity = (self.grad_sums[name] * params[name].detach()).abs().float()
            scores[name] = sensitivity.masked_fill(~mask, -math.inf)
        pruned = pruned_units(scores, self.pattern, self.sparsity, self.distribution)
        return {n: self.pattern.keep_mask(scores[n], pruned[n]) for n in self.names}
