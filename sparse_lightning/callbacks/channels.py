"""Gradual channel pruning on channel groups, with physical compaction (optionally during ``fit``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from sparse_lightning.callbacks.base import SparsityCallback, check_strategy
from sparse_lightning.callbacks.gradual import GradualSchedule
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_choice, check_int
from sparse_lightning.core.masks import is_distributed
from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeValue
from sparse_lightning.core.targets import match_name
from sparse_lightning.structure.compact import (
    check_compactable,
    compact_in_place,
    compact_to_shapes,
    layer_flops,
    slice_like,
)
from sparse_lightning.structure.groups import ChannelCost, ChannelGroup, channel_masks, keep_counts
from sparse_lightning.structure.selection import (
    CRITERIA,
    RANKINGS,
    magnitude_scores,
    max_removable,
    select_channels,
    taylor_scores,
)
from sparse_lightning.structure.tracer import TraceError, trace_groups

COSTS = ("channels", "flops", "params")


def example_inputs_of(trainer: pl.Trainer | None, module: pl.LightningModule, owner: str) -> Any:
    """The module's ``example_input_array``, else the inputs of the first training batch (its first element when
    the batch is a tuple or list), on the module's device."""
    inputs = getattr(module, "example_input_array", None)
    if inputs is None and trainer is not None:
        loader = trainer.fit_loop._data_source.dataloader() if trainer.fit_loop._data_source.is_defined() else None
        batch = next(iter(loader), None) if loader is not None else None
        if isinstance(batch, Tensor):
            inputs = batch
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            inputs = batch[0]
    if inputs is None:
        raise ConfigError(
            f"{owner} needs example inputs to trace the model's channel groups: set `example_input_array` on the "
            "LightningModule (a tensor, a tuple of positional arguments or a dict of keyword arguments), or give a "
            "training batch whose first element is the model's input."
        )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return move_data_to_device(inputs, device)


class ChannelMethod(SparsityCallback):
    """The plumbing of every channel method: channel groups traced from example inputs and selected by
    ``include``/``exclude``, a cost model (``cost``), channel masks ``keeps`` as checkpoint state, and compaction of
    the training module during ``fit`` (optimizer state carried over; a resumed run is compacted to the checkpoint's
    shapes before its weights load). A subclass decides which channels go and when (:meth:`compute_masks`).

    Example inputs for tracing: the LightningModule's ``example_input_array``, else the first training batch's input.
    """

    scores_gradients = False
    costs: tuple[str, ...] = COSTS
    sparsity: float
    updates_in_steps = True
    """Whether masks change in a training step (logged per step) or at an epoch end (logged per epoch)."""

    def __init__(
        self,
        *,
        cost: str = "flops",
        round_to: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        compact_during_fit: bool = False,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.cost = check_choice("cost", cost, self.costs)
        self.round_to = check_int("round_to", round_to, minimum=1)
        if not isinstance(compact_during_fit, bool):
            raise ConfigTypeError(f"`compact_during_fit` must be a bool, got {compact_during_fit!r}.")
        self.compact_during_fit = compact_during_fit
        self.groups: list[ChannelGroup] = []
        self._inputs: Any = None
        self._cost: ChannelCost | None = None
        self._traced: nn.Module | None = None
        self._cost_source: Any = None
        self.compacted_positions: dict[str, dict[int, Tensor]] = {}
        """Per parameter the last compaction during fit resized, per dimension, the positions that survived."""
        self.add_state("keeps", {})

    # --- groups ------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, cost=self.cost)

    def _producer_names(self, group: ChannelGroup) -> list[str]:
        return [m.param for m in group.role("producer", "bias", "norm_weight", "norm_bias")]

    def _select_groups(self, groups: list[ChannelGroup]) -> list[ChannelGroup]:
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns or []:
                if not any(match_name(n, pattern) for g in groups for n in self._producer_names(g)):
                    raise ConfigError(
                        f"`{arg}` pattern {pattern!r} matches no channel group's parameters. Groups: "
                        f"{', '.join(g.name for g in groups)}."
                    )
        chosen = []
        for g in groups:
            names = self._producer_names(g)
            wanted = self.include is None or any(match_name(n, p) for n in names for p in self.include)
            if not wanted or any(match_name(n, p) for n in names for p in self.exclude or []):
                continue
            if g.unsupported is not None:
                if self.include is not None:
                    raise ConfigError(f"Channel group {g.name!r} can not be pruned: {g.unsupported}. Leave it out.")
                continue
            if keep_counts(g.channels, self.round_to)[-1] < g.channels:
                chosen.append(g)
        if not chosen:
            raise ConfigError(
                f"{type(self).__name__} selects no prunable channel group (groups: "
                + ", ".join(f"{g.name} ({g.unsupported or str(g.channels) + ' channels'})" for g in groups)
                + ")."
            )
        return chosen

    def build_groups(self, module: nn.Module, inputs: Any, check: bool = True) -> None:
        """Trace ``module``'s channel groups, select them and set up the cost model; raise ``ConfigError`` on a
        model that can not be traced or compacted, or a ``sparsity`` out of reach."""
        owner = type(self).__name__
        try:
            groups = self._select_groups(trace_groups(module, inputs))
            if check:
                check_compactable(module, inputs, groups)
        except TraceError as err:
            raise ConfigError(f"{owner}: {err}") from None
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{owner}: {err}") from None
        self.groups, self._inputs, self._traced = groups, inputs, module
        self._cost_source = None
        dense = self._cost.dense if self._cost is not None else None
        self._cost = self._make_cost(module, dense)
        if dense is None:
            reachable = max_removable(groups, self._cost, self.round_to)
            if self.sparsity > reachable + 1e-9:
                raise ConfigError(
                    f"{owner}: `sparsity` {self.sparsity} of {self.cost} can not be reached: keeping "
                    f"{'one channel' if self.round_to == 1 else f'{self.round_to} channels'} in each of the "
                    f"{len(groups)} selected groups removes at most {reachable:.4f}."
                )

    def _make_cost(self, module: nn.Module, dense: float | None) -> ChannelCost:
        """The cost model of ``module`` as traced (its FLOPs are counted once per trace)."""
        params = dict(module.named_parameters())
        shapes = {n: p.shape for n, p in params.items()}
        if self._cost_source is None:
            if self.cost == "flops":
                self._cost_source = layer_flops(module, self._inputs)
            else:
                self._cost_source = (sum(p.numel() for p in params.values()), {n: p.numel() for n, p in params.items()})
        total, weights = self._cost_source
        return ChannelCost(self.groups, shapes, weights, float(total), self.cost, dense)

    def select(self, module: nn.Module) -> dict[str, Tensor]:
        if self._traced is not module:
            self.build_groups(
                module,
                self._inputs if self._inputs is not None else example_inputs_of(None, module, type(self).__name__),
            )  # type: ignore[arg-type]
        params = dict(module.named_parameters())
        return {n: params[n] for g in self.groups for n in g.params}

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        plan = super().plan(module, timeline)
        plan.notes.append(
            f"{len(self.groups)} channel groups ({sum(g.channels for g in self.groups)} channels), {self.describe()}; "
            f"sparsity = fraction of {self.cost} removed"
        )
        return plan

    def describe(self) -> str:
        """How channels are chosen, for the plan."""
        raise NotImplementedError

    # --- hooks -------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        if self.compact_during_fit and (trainer.world_size > 1 or is_distributed()):
            raise ConfigError(
                f"{type(self).__name__}(compact_during_fit=True) needs a single device: under DDP every rank's module "
                "would have to be rebuilt together. Keep the masks (compact_during_fit=False) and compact after "
                "training with `sparse_lightning.compact` or `sparse-lightning export --compact`."
            )
        self._cost = None
        self.build_groups(pl_module, example_inputs_of(trainer, pl_module, type(self).__name__))
        super().setup(trainer, pl_module, stage)
        if not self.keeps:
            self.keeps = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in self.groups}
        if self.compact_during_fit:
            self._handles.append(pl_module._register_load_state_dict_pre_hook(self._match_shapes, with_module=True))

    def _load_now(self, state: Mapping[str, Any]) -> None:
        super()._load_now(state)
        if self.keeps and set(self.keeps) != {g.name for g in self.groups}:
            raise ConfigError(
                f"The checkpoint's ChannelPruning groups {sorted(self.keeps)} are not this model's "
                f"{[g.name for g in self.groups]}."
            )
        for g in self.groups:
            self._cost.drop(g.name, (~self.keeps[g.name].cpu()).nonzero().flatten())  # type: ignore[union-attr]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.keeps = {n: k.cpu() for n, k in self.keeps.items()}

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        super().update_masks(trainer, pl_module, step)
        if self.log_sparsity:
            on_step = self.updates_in_steps
            pl_module.log(f"channels/{self.cost}_removed", self.removed_fraction, on_step=on_step, on_epoch=not on_step)
        if self.compact_during_fit and not all(bool(k.all()) for k in self.keeps.values()):
            self._compact(trainer, pl_module)

    @property
    def removed_fraction(self) -> float:
        """The fraction of ``cost`` the current channel masks (and compactions) remove."""
        return self._cost.removed_fraction() if self._cost is not None else 0.0

    # --- compaction during fit ---------------------------------------------------------------------------------

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        old = dict(pl_module.named_parameters())
        positions = self.compacted_positions = compact_in_place(pl_module, self._inputs, self.groups, self.keeps)
        new = dict(pl_module.named_parameters())
        for optimizer in trainer.optimizers:
            carry_optimizer_state(optimizer, old, new, positions)
        self._retrace(pl_module)

    def _retrace(self, pl_module: pl.LightningModule) -> None:
        self.build_groups(pl_module, self._inputs, check=False)
        self.keeps = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in self.groups}
        self.reset_scores()
        params = self.params()
        for name in self.names:
            self.mask_set.add(name, params[name])

    def reset_scores(self) -> None:
        """Forget scores accumulated for the channels of the module before a compaction."""

    def _match_shapes(self, module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *args: Any) -> None:
        """Before a checkpoint's weights load: compact the module to the checkpoint's channel counts."""
        state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if compact_to_shapes(module, self._inputs, state, self.groups):
            self._retrace(module)  # type: ignore[arg-type]


@register("channel_pruning")
class ChannelPruning(GradualSchedule, ChannelMethod):
    """Gradual channel pruning: whole channel groups leave on the schedule of Zhu & Gupta 2017.

    Channel groups come from :mod:`sparse_lightning.structure` (torch-pruning's dependency graph): a group's
    channels are a layer's output rows and bias, its normalization channels, every consumer's input columns and all
    producers of one residual sum, masked together so that the masked model computes exactly what the compacted one
    computes. Groups whose channels reach the model's outputs, and groups holding LayerNorm, GroupNorm, attention,
    recurrent or grouped (non-depthwise) convolution layers, are never pruned.

    At every event the target fraction of ``cost`` removed follows ``curve`` from ``initial_sparsity`` to
    ``sparsity`` between ``start`` and ``end`` (dropped channels never return). Channels are scored by
    ``criterion`` (:mod:`sparse_lightning.structure.selection`: ``l1`` Li et al. 2017, ``l2``, ``taylor`` Molchanov
    et al. 2019) and, with ``ranking="global"``, ranked across groups after dividing each group's scores by the mean
    over its kept channels (raw L1 norms grow with fan-in, so unnormalized global ranking empties the narrowest
    layers first; the Taylor paper ranks raw scores globally); ``"uniform"`` removes the same fraction from every
    group. Channels leave ``round_to`` at a time, so kept counts stay multiples of ``round_to``; at least
    ``round_to`` (at least one) channel stays in every group. The cost reaches its target within one chunk of
    channels (``flops`` and ``params`` are exact under channel masks; see :class:`~.groups.ChannelCost`).

    ``sparse_lightning.compact`` (or ``sparse-lightning export --compact``) removes the masked channels after
    training. With ``compact_during_fit=True`` (single device only) they are removed from the training module after
    each event: the optimizer keeps its object and learning-rate scheduler, each surviving entry keeps its state
    (momentum, Adam moments), and a run resumed from a checkpoint is compacted to the checkpoint's shapes before its
    weights load.

    Example inputs for tracing: the LightningModule's ``example_input_array``, else the first training batch's input.

    Args:
        sparsity: fraction of ``cost`` removed at ``end``, in [0, 1).
        cost: ``channels`` (of the selected groups), ``flops`` (one forward, ``torch.utils.flop_counter``) or
            ``params`` (of the whole model).
        criterion: ``l1``, ``l2`` or ``taylor``.
        ranking: ``global`` or ``uniform``.
        round_to: kept channel counts are multiples of this (8 suits tensor cores); default 1.
        initial_sparsity, start, end, every, curve: the schedule, as :class:`GradualMagnitudePruning`'s.
        include, exclude: patterns on the names of a group's producer parameters (the weights and biases whose
            output channels the group holds, and its norms): a group is selected when one of them matches
            ``include`` (default: every group that can be pruned) and none matches ``exclude``.
        compact_during_fit: remove masked channels from the training module after each event (single device).
        log_sparsity: log through the shared helper; each event also logs ``channels/<cost>_removed``.
    """

    scores_gradients = False
    costs: tuple[str, ...] = COSTS

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        cost: str = "flops",
        criterion: str = "l1",
        ranking: str = "global",
        round_to: int = 1,
        initial_sparsity: float = 0.0,
        start: TimeValue = 0,
        end: TimeValue = 0.75,
        every: TimeValue = 100,
        curve: str = "cubic",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        compact_during_fit: bool = False,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(
            cost=cost,
            round_to=round_to,
            include=include,
            exclude=exclude,
            compact_during_fit=compact_during_fit,
            log_sparsity=log_sparsity,
        )
        self.init_schedule(sparsity, initial_sparsity, start, end, every, curve)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.ranking = check_choice("ranking", ranking, RANKINGS)
        self.scores_gradients = criterion == "taylor"
        self.add_state("taylor_sum", {})
        self.add_state("taylor_steps", 0)

    def describe(self) -> str:
        return f"{self.criterion} criterion, {self.ranking} ranking"

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        pending = self.end_step is not None and step <= self.end_step
        if self.criterion == "taylor" and pending and step != self.last_update_step and self._gradients_finite():
            params = self.params()
            for g in self.groups:
                score = taylor_scores(g, params)
                self.taylor_sum[g.name] = self.taylor_sum[g.name] + score if g.name in self.taylor_sum else score
            self.taylor_steps += 1
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def scores(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per selected group, the criterion's score of each channel (the Taylor average since the last event)."""
        if self.criterion == "taylor":
            steps = max(self.taylor_steps, 1)
            return {
                g.name: self.taylor_sum.get(g.name, torch.zeros(g.channels, dtype=torch.float64)) / steps
                for g in self.groups
            }
        return {g.name: magnitude_scores(g, params, self.criterion) for g in self.groups}

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self._cost is not None
        self.keeps = select_channels(
            self.groups, self.scores(params), self.keeps, self._cost, self.target_at(step), self.round_to, self.ranking
        )
        self.taylor_sum, self.taylor_steps = {}, 0
        return channel_masks(self.groups, self.keeps, {n: params[n].shape for n in self.names})

    def reset_scores(self) -> None:
        self.taylor_sum, self.taylor_steps = {}, 0


def carry_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    positions: Mapping[str, Mapping[int, Tensor]],
) -> None:
    """Point ``optimizer`` at the resized parameters and slice each one's state (momentum, Adam moments) to the
    surviving positions; the optimizer object, its hyperparameters and step counts stay."""
    by_id = {id(p): n for n, p in old.items()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            name = by_id.get(id(p))
            if name is None or name not in positions:
                continue
            replacement = new[name]
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[replacement] = {
                    k: slice_like(v, positions[name]).contiguous()
                    if isinstance(v, Tensor) and v.shape == p.shape
                    else v
                    for k, v in state.items()
                }
            group["params"][i] = replacement
