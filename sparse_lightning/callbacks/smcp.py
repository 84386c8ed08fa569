"""SMCP: soft-mask channel pruning under a cost budget (Humble, Shen, Latorre, Kautz & Alvarez, ECCV 2022)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from sparse_lightning.callbacks.channels import ChannelMethod, ChannelPruning
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_choice, check_int
from sparse_lightning.core.masks import check_ranks_agree, fingerprint, is_distributed
from sparse_lightning.core.plan import Timeline
from sparse_lightning.core.schedules import TimeValue
from sparse_lightning.structure.groups import ChannelCost, ChannelGroup, channel_masks, keep_counts, member_sums
from sparse_lightning.structure.knapsack import multiple_choice_knapsack
from sparse_lightning.structure.latency import (
    LatencyCost,
    LatencyTable,
    cache_path,
    latency_key,
    load_latency_table,
    measure_latency,
)

IMPORTANCES = ("weight", "taylor_fo", "taylor_so")
SOURCES = ("gradient", "optimizer")
ACCUMULATIONS = ("latest", "average", "momentum")
RAMPS = ("exp", "exp2", "linear")


def ramp_ratio(ramp: str, ratio: float, progress: float, length: float) -> float:
    """The pruned fraction of cost after ``progress`` of ``length`` epochs of the ramp (SMCP's schedules):
    ``exp`` r (1 - e^{-0.05 k}) / (1 - e^{-0.05 K}), ``exp2`` 1 - (1 - r)^{k/K} (FORCE), ``linear`` r k / K."""
    if progress <= 0:
        return 0.0
    if progress >= length:
        return ratio
    if ramp == "exp":
        return ratio * (1 - math.exp(-0.05 * progress)) / (1 - math.exp(-0.05 * length))
    if ramp == "exp2":
        return 1 - (1 - ratio) ** (progress / length)
    return ratio * progress / length


def element_importance(kind: str, weight: Tensor, grad: Tensor | None, hess: Tensor | None = None) -> Tensor:
    """SMCP's importance of each weight: ``weight`` |w|; ``taylor_fo`` -w g; ``taylor_so`` -w g + 1/2 w^2 h, with h
    the squared gradient or the optimizer's second moment."""
    if kind == "weight":
        return weight.abs()
    assert grad is not None
    first = -weight * grad
    if kind == "taylor_fo":
        return first
    return first + 0.5 * weight.square() * (grad.square() if hess is None else hess)


@register("soft_mask_channel_pruning")
class SoftMaskChannelPruning(ChannelPruning):
    """SMCP: channels are masked softly and chosen by a knapsack under a cost budget.

    Humble, Shen, Latorre, Kautz & Alvarez, "Soft Masking for Cost-Constrained Channel Pruning" (ECCV 2022), on the
    channel groups of :class:`ChannelPruning`.

    - **Soft mask.** From ``start`` to ``end`` the forward pass (training and validation) sees w * m on the input
      columns of every consumer of a dropped channel (the reference's input-channel masks), and the backward pass is
      straight-through: the gradient taken at the masked weights updates the
      dense weights, so masked channels keep learning and may return at the next re-solve. *This is a documented
      exception to "gradients of masked entries are zeroed".* Masked weights get ``pruned_decay`` x w added to their
      gradient (reference: 2e-4). At ``end`` the masks become hard (exact zeros and every guarantee of the engine) and
      stay; ``compact`` then removes them.
    - **Importance** of each weight: ``weight`` |w| (the reference's default), ``taylor_fo`` -w g, ``taylor_so``
      -w g + 1/2 w^2 g^2; with ``source="optimizer"`` g and g^2 are the optimizer's first and second moments (Adam's
      ``exp_avg``/``exp_avg_sq``, SGD's momentum buffer). A channel's score is |sum| of its consumers' importances
      over their kept output rows and kernel (the reference's input-channel scoring), accumulated between re-solves
      as the ``latest`` value, the ``average`` or a ``momentum`` average; steps with non-finite gradients are skipped.
    - **Budget.** Every ``every`` steps each group offers "keep the top j channels" (j a multiple of ``round_to``; the
      reference's option of keeping none, removing a layer, is left out: compaction keeps at least one channel), valued
      by the summed scores and costed with the other groups at their current widths (each layer's cost belongs to the
      group of its input channels, as in the reference); one option per group maximises the value under cost <= (1 -
      ratio_t) x dense cost, solved exactly by :func:`~sparse_lightning.structure.knapsack.multiple_choice_knapsack`.
      Deliberate difference: the costs are linearised at the current widths (a layer's cost also depends on its output
      group), so the answer is checked with the exact cost, the budget tightened if it misses, and then channels are
      given back (best score per unit of exact cost) while the budget holds, so the final choice meets the target
      tightly (the reference solves once with the linearised costs, by a meet-in-the-middle search).
    - **Schedule.** ratio 0 before ``start``, a ``ramp`` to ``sparsity`` at ``end`` in epochs (``exp``, the
      reference's default, ``exp2``, ``linear``; see :func:`ramp_ratio`), held after. Deliberate difference: the
      reference evaluates the ramp at whole epochs and reaches the target one epoch after the ramp; here the ramp is
      continuous and reaches it at ``end``.

    **Latency.** With ``cost="latency"`` a layer costs its measured forward latency on the training device
    (:mod:`sparse_lightning.structure.latency`: each Conv/Linear layer timed alone at a grid of ``latency_points``
    input and output widths, interpolated between them; the rest of the model a constant). The table is measured
    once, by rank 0, and cached under a name that holds its key (model architecture, input shape, device, torch
    version, threads); ``latency_table`` names a table file to use instead, refused when it is missing or was
    measured for another key. The table travels in the checkpoint, so a resumed run solves with the same numbers.
    Deliberate difference: the reference reads per-(input, output) latencies from a table measured on one GPU (not
    in its repository); here the grid is coarser and interpolated, so measuring takes seconds, not hours.

    Args:
        sparsity: fraction of ``cost`` removed from ``end`` on (the reference's channel ratio), in [0, 1).
        cost: ``flops``, ``params`` or ``latency``.
        importance: ``weight``, ``taylor_fo`` or ``taylor_so``.
        source: ``gradient`` (this step's) or ``optimizer`` (its moments).
        accumulate: ``latest``, ``average`` or ``momentum`` (with ``momentum``).
        round_to: kept widths are multiples of this (reference: 8).
        pruned_decay: extra decay on masked weights during the soft phase.
        ramp: ``exp``, ``exp2`` or ``linear``.
        start, end, every: time arguments as everywhere in the plugin.
        latency_table: with ``cost="latency"``, a table file to use (default: measure once and cache).
        latency_points: widths per dimension at which each layer is timed.
        include, exclude, log_sparsity: as :class:`ChannelPruning`.
    """

    costs = ("flops", "params", "latency")

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        cost: str = "flops",
        importance: str = "weight",
        source: str = "gradient",
        accumulate: str = "average",
        momentum: float = 0.9,
        round_to: int = 8,
        pruned_decay: float = 2e-4,
        ramp: str = "exp",
        start: TimeValue = 0.1,
        end: TimeValue = 0.75,
        every: TimeValue = 80,
        latency_table: str | os.PathLike | None = None,
        latency_points: int = 6,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(
            sparsity,
            cost=cost,
            round_to=round_to,
            start=start,
            end=end,
            every=every,
            include=include,
            exclude=exclude,
            log_sparsity=log_sparsity,
        )
        check_choice("importance", importance, IMPORTANCES)
        check_choice("source", source, SOURCES)
        check_choice("accumulate", accumulate, ACCUMULATIONS)
        check_choice("ramp", ramp, RAMPS)
        for name, value in (("momentum", momentum), ("pruned_decay", pruned_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"`{name}` must be a number in [0, 1), got {value!r}.")
        if latency_table is not None and cost != "latency":
            raise ConfigError(f"`latency_table` is for `cost='latency'`; this callback's cost is {cost!r}.")
        if latency_table is not None and not isinstance(latency_table, (str, os.PathLike)):
            raise ConfigTypeError(f"`latency_table` must be a path, got {latency_table!r}.")
        self.latency_table = latency_table
        self.latency_points = check_int("latency_points", latency_points, minimum=2)
        self.importance, self.source, self.accumulate, self.ramp = importance, source, accumulate, ramp
        self.momentum, self.pruned_decay = float(momentum), float(pruned_decay)
        self.scores_gradients = importance != "weight"
        self.steps_per_epoch = 1.0
        self._dense: dict[str, Tensor] = {}
        self._soft: dict[str, Tensor] = {}
        self._soft_for: dict[str, Tensor] | None = None
        self.add_state("hard", False)
        self.add_state("score_sum", {})
        self.add_state("score_steps", 0)
        self.add_state("returned", 0)
        self.add_state("latency", {})
        self._trainer: pl.Trainer | None = None

    def describe(self) -> str:
        return (
            f"{self.importance} importance, knapsack under the budget, {self.ramp} ramp; soft masks until `end`, "
            "hard after"
        )

    # --- schedule ----------------------------------------------------------------------------------------------

    def resolve_schedule(self, timeline: Timeline) -> None:
        super().resolve_schedule(timeline)
        self.steps_per_epoch = timeline.steps_per_epoch if math.isfinite(timeline.steps_per_epoch) else 1.0

    def target_at(self, step: int) -> float:
        assert self.start_step is not None and self.end_step is not None
        epochs = (self.end_step - self.start_step) / self.steps_per_epoch
        return ramp_ratio(self.ramp, self.sparsity, (step - self.start_step) / self.steps_per_epoch, epochs)

    # --- importance --------------------------------------------------------------------------------------------

    def _row_keeps(self) -> dict[str, Tensor]:
        """Per parameter, its kept output rows (dimension 0) under the current soft masks."""
        rows: dict[str, Tensor] = {}
        params = self.params()
        for g in self.groups:
            for m in g.members:
                if m.dim == 0 and m.role != "consumer":
                    keep = torch.ones(params[m.param].shape[0], dtype=torch.bool)
                    keep[m.index] = self.keeps[g.name][m.channel]
                    rows[m.param] = rows[m.param] & keep if m.param in rows else keep
        return rows

    def step_scores(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """This step's score of every channel: |sum of its consumers' importances over their kept rows|."""
        params, rows = self.params(), self._row_keeps()
        scores = {}
        for g in self.groups:
            total = torch.zeros(g.channels, dtype=torch.float64)
            for m in g.role("consumer"):
                p = params[m.param]
                grad, hess = p.grad, None
                if self.source == "optimizer" and optimizer is not None and self.importance != "weight":
                    state = optimizer.state.get(p, {})
                    grad = state.get("exp_avg", state.get("momentum_buffer", grad))
                    hess = state.get("exp_avg_sq") if self.importance == "taylor_so" else None
                imp = element_importance(self.importance, p.detach(), grad, hess)
                if m.param in rows and m.dim != 0:
                    imp = imp * rows[m.param].to(imp.device).view(-1, *[1] * (imp.dim() - 1))
                total += member_sums(m, imp, g.channels)
            scores[g.name] = total.abs()
        return scores

    def _accumulate(self, scores: Mapping[str, Tensor]) -> None:
        for name, s in scores.items():
            if self.accumulate == "latest" or name not in self.score_sum:
                self.score_sum[name] = s.clone()
            elif self.accumulate == "momentum":
                self.score_sum[name] = self.momentum * self.score_sum[name] + (1 - self.momentum) * s
            else:
                self.score_sum[name] = self.score_sum[name] + s
        self.score_steps = 1 if self.accumulate != "average" else self.score_steps + 1

    def scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.score_sum:
            return self.step_scores(None)
        return {n: s / max(self.score_steps, 1) for n, s in self.score_sum.items()}

    # --- the knapsack ------------------------------------------------------------------------------------------

    def _fresh_cost(self, keeps: Mapping[str, Tensor]) -> ChannelCost:
        assert self._cost is not None
        cost = self._make_cost(self._traced, self._cost.dense)  # type: ignore[arg-type]
        for g in self.groups:
            cost.drop(g.name, (~keeps[g.name]).nonzero().flatten())
        return cost

    def _option_costs(
        self, cost: ChannelCost, group: ChannelGroup, counts: list[int], homes: Mapping[str, tuple[str, int]]
    ) -> Tensor:
        """Cost of the layers whose input channels ``group`` holds (producers where a layer consumes no group), at
        each kept count, the other groups at their current widths."""
        result = torch.zeros(len(counts), dtype=torch.float64)
        for m in group.members:
            if homes.get(m.param) != (group.name, m.dim):
                continue
            per_channel = len(m.index) / group.channels
            size = cost.shapes[m.param][m.dim]
            kept = cost.kept_of(m.param)
            for i, j in enumerate(counts):
                result[i] += cost.param_cost(m.param, {**kept, m.dim: size - (group.channels - j) * per_channel})
        return result

    def _homes(self, cost: ChannelCost) -> dict[str, tuple[str, int]]:
        homes: dict[str, tuple[str, int]] = {}
        for roles in (("consumer",), ("producer", "bias", "norm_weight", "norm_bias", "other")):
            for g in self.groups:
                for m in g.role(*roles):
                    if m.param in cost.weights and m.param not in homes:
                        homes[m.param] = (g.name, m.dim)
        return homes

    def solve(self, ratio: float, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Channel masks of the best total score under cost <= (1 - ratio) x dense (see the class docstring).

        The knapsack's option costs are linearised at the current widths. Its answer is checked with the exact cost:
        if it misses the target, the budget is tightened by the shortfall and the knapsack solved again from there;
        then channels are given back, best score per unit of exact cost first, while the target still holds, so the
        final choice sits at the budget.
        """
        point = {n: k.clone() for n, k in self.keeps.items()}
        target = ratio
        keeps = point
        for _ in range(10):
            keeps = self._knapsack(target, scores, point)
            exact = self._fresh_cost(keeps).removed_fraction()
            if exact >= ratio - 1e-9:
                break
            target, point = min(target + (ratio - exact) + 1e-6, 1.0), keeps
        else:
            raise RuntimeError(f"{type(self).__name__}: no channel choice meets the cost target {ratio:.4f}.")
        return self._give_back(keeps, ratio, scores)

    def _give_back(self, keeps: dict[str, Tensor], ratio: float, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        keeps = {n: k.clone() for n, k in keeps.items()}
        current = self._fresh_cost(keeps).current()
        while True:
            best = None
            for g in self.groups:
                kept = int(keeps[g.name].sum())
                larger = [c for c in keep_counts(g.channels, self.round_to) if c > kept]
                if not larger:
                    continue
                dropped = (~keeps[g.name]).nonzero().flatten()
                ranked = dropped[torch.argsort(scores[g.name][dropped], descending=True, stable=True)]
                add = ranked[: min(larger) - kept]
                trial = dict(keeps)
                trial[g.name] = keeps[g.name].clone()
                trial[g.name][add] = True
                cost = self._fresh_cost(trial)
                if cost.removed_fraction() < ratio - 1e-9:
                    continue
                gain = float(scores[g.name][add].sum()) / max(cost.current() - current, 1e-12)
                if best is None or gain > best[0]:
                    best = (gain, trial, cost.current())
            if best is None:
                return keeps
            _, keeps, current = best

    def _knapsack(self, ratio: float, scores: Mapping[str, Tensor], point: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cost = self._fresh_cost(point)
        homes = self._homes(cost)
        constant = cost.constant + sum(cost.param_cost(p, cost.kept_of(p)) for p in cost.weights if p not in homes)
        budget = (1 - min(ratio, 1.0)) * cost.dense - constant
        values, costs, orders, options = [], [], [], []
        for g in self.groups:
            counts = keep_counts(g.channels, self.round_to)
            order = torch.argsort(scores[g.name], descending=True, stable=True)
            cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), scores[g.name][order].double().cumsum(0)])
            values.append(cumulative[counts])
            costs.append(self._option_costs(cost, g, counts, homes))
            orders.append(order)
            options.append(counts)
        cheapest = sum(float(c.min()) for c in costs)
        picked, _, _ = multiple_choice_knapsack(values, costs, max(budget, cheapest))
        keeps = {}
        for g, order, counts, choice in zip(self.groups, orders, options, picked, strict=True):
            keep = torch.zeros(g.channels, dtype=torch.bool)
            keep[order[: counts[choice]]] = True
            keeps[g.name] = keep
        return keeps

    # --- hooks -------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":
            self.latency = {}  # measured for this model (a checkpoint's table replaces it when it loads)
        super().setup(trainer, pl_module, stage)
        if (
            stage == "fit"
            and self.round_to > 1
            and not any(keep_counts(g.channels, self.round_to)[-1] < g.channels for g in self.groups)
        ):
            raise ConfigError(f"No selected group has more than `round_to`={self.round_to} channels to prune.")

    # --- latency -----------------------------------------------------------------------------------------------

    def _make_cost(self, module: nn.Module, dense: float | None) -> ChannelCost:
        if self.cost != "latency":
            return super()._make_cost(module, dense)
        if self._cost_source is None:
            self._cost_source = self._latency_table(module)
        shapes = {n: p.shape for n, p in module.named_parameters()}
        try:
            return LatencyCost(self.groups, shapes, self._cost_source, dense)  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None

    def _latency_table(self, module: nn.Module) -> LatencyTable:
        """The checkpoint's table, else rank 0's (loaded from ``latency_table`` or the cache, or measured and
        cached), broadcast to every rank; errors are raised on every rank."""
        if not self.latency:
            trainer = self._trainer
            data: dict[str, Any] | None = None
            if trainer is None or trainer.is_global_zero:
                try:
                    data = self._load_or_measure(module, trainer).to_dict()
                except ValueError as err:
                    data = {"error": str(err)}
            if trainer is not None and trainer.world_size > 1:
                data = trainer.strategy.broadcast(data, src=0)
            assert data is not None
            if "error" in data:
                raise ConfigError(f"{type(self).__name__}: {data['error']}")
            self.latency = data
        return LatencyTable.from_dict(self.latency)

    def _load_or_measure(self, module: nn.Module, trainer: pl.Trainer | None) -> LatencyTable:
        device = trainer.strategy.root_device if trainer is not None else None
        inputs = self._inputs
        if device is not None:
            inputs = move_data_to_device(inputs, device)
        key = latency_key(module, inputs, device)
        if self.latency_table is not None:
            return load_latency_table(self.latency_table, key)
        path = cache_path(key)
        if path.is_file():
            rank_zero_info(f"{type(self).__name__}: latency table from {path}")
            return load_latency_table(path, key)
        table = measure_latency(
            module, inputs, points=self.latency_points, round_to=self.round_to, device=device, progress=rank_zero_info
        )
        table.save(path)
        rank_zero_info(f"{type(self).__name__}: latency table measured and cached in {path}")
        return table

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if self.cost == "latency" and state.get("latency") and state["latency"] != self.latency:
            self.latency = state["latency"]
            self._cost_source = None
            self._cost = self._make_cost(self._traced, None)  # type: ignore[arg-type]
        super()._load_now(state)

    def _soft_masks(self) -> dict[str, Tensor]:
        """The soft masks: only the consumers' input columns of dropped channels (the reference's input-channel
        masks). That removes the channels from every later layer, and their columns still get a straight-through
        gradient (their inputs are alive); masking producers and norms too would leave a dropped channel no gradient
        at all, so it could never return."""
        params = self.params()
        consumers = [ChannelGroup(g.name, g.channels, g.role("consumer")) for g in self.groups]
        return channel_masks(consumers, self.keeps, {n: params[n].shape for n in self.names})

    def _current_soft(self) -> dict[str, Tensor]:
        """The soft masks that mask something, on their parameters' devices, built once per set of channel masks
        (``self.keeps`` is replaced, never changed in place, at every re-solve and load)."""
        if self._soft_for is not self.keeps:
            params = self.params()
            masks = self._soft_masks().items()
            self._soft = {n: m.to(params[n].device) for n, m in masks if not bool(m.all())}
            self._soft_for = self.keeps
        return self._soft

    def _mask_softly(self) -> None:
        if self.hard or self._dense:
            return
        params = self.params()
        with torch.no_grad():
            for name, mask in self._current_soft().items():
                self._dense[name] = params[name].detach().clone()
                params[name].mul_(mask)

    def _restore_dense(self) -> None:
        """Straight-through: the gradient taken at w * m updates the dense w (and masked weights decay)."""
        if not self._dense:
            return
        params = self.params()
        with torch.no_grad():
            for name, dense in self._dense.items():
                params[name].copy_(dense)
                grad = params[name].grad
                if grad is not None and self.pruned_decay:
                    grad.add_(dense * ~self._soft[name], alpha=self.pruned_decay)
        self._dense = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._mask_softly()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mask_softly()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dense:
            params = self.params()
            with torch.no_grad():
                for name, dense in self._dense.items():
                    params[name].copy_(dense)
            self._dense = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._restore_dense()
        step = trainer.global_step
        soft_phase = not self.hard and self.end_step is not None and step <= self.end_step
        if soft_phase and self.importance != "weight" and self._gradients_finite():
            self._accumulate(self.step_scores(optimizer))
        super(ChannelPruning, self).on_before_optimizer_step(trainer, pl_module, optimizer)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.end_step is not None
        if self.importance == "weight":
            self.score_sum, self.score_steps = {}, 0
        before = {n: k.clone() for n, k in self.keeps.items()}
        if step >= self.end_step:
            super(ChannelMethod, self).update_masks(trainer, pl_module, step)  # hard: the engine's masks
            self.hard = True
        else:
            self.keeps = self.solve(self.target_at(step), self.scores(self.params()))
            self.score_sum, self.score_steps = {}, 0
            if is_distributed():
                check_ranks_agree({n: fingerprint(k) for n, k in self.keeps.items()}, "soft masks", type(self).__name__)
            self.last_update_step = step
        self.returned += sum(int((~before[n] & self.keeps[n]).sum()) for n in before)
        self._cost = self._fresh_cost(self.keeps)
        if self.log_sparsity:
            pl_module.log(f"channels/{self.cost}_removed", self.removed_fraction, on_step=True, on_epoch=False)
            pl_module.log("channels/returned", float(self.returned), on_step=True, on_epoch=False)

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.keeps = self.solve(self.target_at(step), self.scores(params))
        return channel_masks(self.groups, self.keeps, {n: params[n].shape for n in self.names})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.hard and self.last_update_step >= 0:  # stopped early: harden what was reached
            super(ChannelMethod, self).update_masks(trainer, pl_module, trainer.global_step)
            self.hard = True
        super().on_fit_end(trainer, pl_module)
