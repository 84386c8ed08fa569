"""The small base class that carries the plumbing, so each method file holds only its own mathematics.

A subclass says *which* masks (``initial_masks``, ``compute_masks``) and *when* (``resolve_schedule``,
``is_update_step``, ``events``) and declares its state (``add_state``); the base selects the parameters, checks every
argument before training, describes the method as data (``plan``), installs masks in the module's shared
:class:`~sparse_lightning.core.masks.MaskSet`, keeps masked weights at exactly zero through every optimizer step,
zeroes the optimizer state of pruned entries, keeps ranks identical under DDP, logs, and saves and restores its
state in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sparse_lightning.callbacks.monitor import SparsityWriter, sparsity_writer
from sparse_lightning.core.errors import ConfigError, ConfigTypeError
from sparse_lightning.core.masks import MaskSet, check_ranks_agree, fingerprint, is_distributed
from sparse_lightning.core.patterns import Pattern
from sparse_lightning.core.plan import Event, MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeSpec
from sparse_lightning.core.targets import match_name, select_parameters


def check_fraction(name: str, value: float, high_inclusive: bool = False) -> float:
    """``value`` in [0, 1) (or [0, 1]); ``ValueError`` naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigTypeError(f"`{name}` must be a number in [0, 1{']' if high_inclusive else ')'}, got {value!r}.")
    if not (0.0 <= value <= 1.0 if high_inclusive else 0.0 <= value < 1.0):
        raise ConfigError(f"`{name}` must lie in [0, 1{']' if high_inclusive else ')'}, got {value}.")
    return float(value)


def check_patterns(name: str, value: Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigTypeError(
            f"`{name}` must be a list of parameter-name patterns (globs or 're:' regexes), got {value!r}."
        )
    return list(value)


ZERO_PRESERVING_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adamax,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.RMSprop,
    }
)
"""Optimizers whose update of an entry with zero weight, zero gradient and zero state is exactly zero.

For them the post-step re-masking is skipped: gradients of masked entries are zeroed before every step and their
optimizer state at every mask change (and when training starts, so state restored from any checkpoint is clean),
so the step leaves masked weights at exactly 0.0 by itself; the tests check it after every step. This saves one
full pass over the masked weights per step (about 5% of a ResNet-18 step on one CPU thread). Any other optimizer
(including subclasses of these, which may change ``step``) is re-masked after every step it really takes.
"""


SERVED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)
"""Strategies served, matched by exact type: one device, and DDP with any start method (``"ddp"``, ``"ddp_spawn"``,
``"ddp_fork"``, ``"ddp_notebook"`` all build a ``DDPStrategy``). Subclasses are refused: ``DeepSpeedStrategy`` and
``XLAStrategy`` derive from ``DDPStrategy`` but shard or move parameters where masks would not reach them."""


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Refuse, by name, a strategy that :data:`SERVED_STRATEGIES` does not hold."""
    strategy = type(trainer.strategy)
    if strategy not in SERVED_STRATEGIES:
        raise ConfigError(
            f"{owner} does not support the {strategy.__name__} strategy: masks and method state would not reach "
            "sharded or relocated parameters. Served: a single device, or DDP (`strategy='ddp'`, 'ddp_spawn', "
            "'ddp_fork', 'ddp_notebook')."
        )


def timeline_of(trainer: pl.Trainer) -> Timeline:
    """The run's length in optimizer steps, as Lightning estimates it (``math.inf`` where unknown)."""
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else math.inf
    return Timeline(float(trainer.estimated_stepping_batches), float(per_epoch))


def _saved(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return value.get_state()
    if hasattr(value, "load_state_dict"):
        return _saved(value.state_dict())
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _saved(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_saved(v) for v in value]
    return value


def _restored(current: Any, saved: Any, device: torch.device) -> Any:
    if isinstance(current, torch.Generator):
        current.set_state(saved)
        return current
    if hasattr(current, "load_state_dict"):
        current.load_state_dict(saved)
        return current
    if isinstance(saved, Tensor):
        return saved.to(device).clone()
    if isinstance(saved, dict):
        return {k: _restored(None, v, device) for k, v in saved.items()}
    return saved


class Variants:
    """Lets a method's constructor return a subclass chosen by its arguments (``Method(structured=True)`` is a
    ``StructuredMethod``): the subclass is an instance of the method, and the method's ``__init__`` stays the
    signature that recipes, the command line and ``LightningCLI`` read."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls.variant(kwargs))  # type: ignore[misc]

    @classmethod
    def variant(cls, kwargs: Mapping[str, Any]) -> type:
        """The class to build for keyword arguments ``kwargs`` (default: ``cls``)."""
        return cls


class MethodCallback(pl.Callback):
    """What every method callback shares: declared state in checkpoints, the strategy check and :meth:`plan`.

    A method declares each piece of its state once with :meth:`add_state` (as torchmetrics' ``add_state``): it is
    saved in the callback's ``state_dict`` (tensors moved to the CPU, a ``torch.Generator`` as its state, so the
    checkpoint loads with ``torch.load(weights_only=True)``; an object with ``state_dict``/``load_state_dict`` as
    its state dict) and restored on the module's device on resume, also when Lightning loads it before ``setup``.
    """

    def __init__(self) -> None:
        self._state_names: list[str] = []
        self._module: pl.LightningModule | None = None
        self._pending_state: dict[str, Any] | None = None

    def add_state(self, name: str, default: Any) -> None:
        """Declare ``self.<name>`` (starting at ``default``) as state saved in checkpoints."""
        if name in self._state_names:
            raise RuntimeError(f"{type(self).__name__} declares state {name!r} twice.")
        setattr(self, name, default)
        self._state_names.append(name)

    @property
    def window(self) -> tuple[TimeSpec, TimeSpec] | None:
        """``(start, end)`` as given, for methods that act within a window of training (``None`` otherwise)."""
        return None

    def plan(self, module: torch.nn.Module, timeline: Timeline) -> MethodPlan:
        """What this callback would do on ``module`` over a run of ``timeline``; raises as training would."""
        raise NotImplementedError

    def states(self) -> dict[str, Any]:
        return {name: _saved(getattr(self, name)) for name in self._state_names}

    def load_states(self, state: Mapping[str, Any]) -> None:
        """Restore every declared state the checkpoint holds; one it lacks (saved before that state was declared)
        keeps its default."""
        device = self._module.device if self._module is not None else torch.device("cpu")
        for name in self._state_names:
            if name in state:
                setattr(self, name, _restored(getattr(self, name), state[name], device))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._module is None:
            self._pending_state = dict(state_dict)
        else:
            self._load_now(state_dict)
            self._pending_state = None

    def _load_now(self, state: Mapping[str, Any]) -> None:
        self.load_states(state)


class SparsityCallback(MethodCallback):
    """Base of every mask-producing callback.

    Args:
        include: parameter-name patterns to select (globs or ``re:`` regexes). Default: the ``weight`` of every
            Linear and ConvNd module.
        exclude: patterns removed from the selection.
        log_sparsity: log sparsity through the shared helper of :mod:`sparse_lightning.callbacks.monitor`: one
            writer (a :class:`~sparse_lightning.callbacks.monitor.SparsityMonitor` if there is one, otherwise the
            first callback with ``log_sparsity``) logs every mask on the module, however many methods share it.

    Under DDP every rank computes its masks itself (from the same weights and the same averaged gradients); after
    each update the ranks compare fingerprints of the new masks and of the selected weights and raise, naming the
    method, the parameters and the ranks, if they differ.
    """

    sparsity: float | None = None
    """The final fraction of zeros over the selected weights (``None``: set by something else, the model's zeros)."""

    scores_gradients: bool = False
    """Whether ``compute_masks`` reads gradients. An update due on a step whose selected gradients are not finite
    (a step that AMP's ``GradScaler`` will skip) is then deferred to the next step with finite gradients."""

    def __init__(
        self,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__()
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        if not isinstance(log_sparsity, bool):
            raise ConfigTypeError(f"`log_sparsity` must be a bool, got {log_sparsity!r}.")
        self.log_sparsity = log_sparsity
        self.names: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._writer = SparsityWriter()
        self.add_state("last_update_step", -1)
        self.add_state("deferred_update", False)
        self.add_state("planned_timeline", None)

    # --- what a method provides --------------------------------------------------------------------------------

    @property
    def current_target(self) -> float | None:
        """The sparsity this callback is aiming at now (logged as ``sparsity/target``)."""
        return None

    def validate(self, params: Mapping[str, Tensor]) -> None:
        """Check the selected parameters before any mask is installed; raise ``ConfigError`` on bad input."""

    def resolve_schedule(self, timeline: Timeline) -> None:
        """Turn time arguments into optimizer steps for a run of ``timeline`` (one rule: :meth:`Timeline.window`)."""

    def events(self) -> list[Event]:
        """What happens when, once :meth:`resolve_schedule` has run (initial masks at ``setup`` are not listed)."""
        return []

    def memory_bytes(self, params: Mapping[str, Tensor]) -> int:
        """Extra memory this method holds besides the masks (bytes)."""
        return 0

    def initial_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masks installed at ``setup`` for the selected parameters that have none yet (missing: keep everything)."""
        return {}

    def is_update_step(self, step: int) -> bool:
        return False

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """New masks for ``self.names`` at optimizer step ``step``."""
        raise NotImplementedError

    def layer_targets(self) -> dict[str, float]:
        """Per selected parameter, the fraction its mask removes (the method's current per-layer target)."""
        return {n: self.mask_set.sparsity([n]) for n in self.names}

    # --- the plan ----------------------------------------------------------------------------------------------

    def select(self, module: torch.nn.Module) -> dict[str, Tensor]:
        """The selected parameters of ``module``, checked by :meth:`validate`."""
        params = dict(module.named_parameters())
        selected = {n: params[n] for n in select_parameters(module, self.include, self.exclude)}
        self.validate(selected)
        return selected

    def plan(self, module: torch.nn.Module, timeline: Timeline) -> MethodPlan:
        selected = self.select(module)
        self.resolve_schedule(timeline)
        return MethodPlan(
            method=type(self).__name__,
            parameters={n: tuple(p.shape) for n, p in selected.items()},
            target=self.sparsity,
            events=self.events(),
            memory_bytes=self.memory_bytes(selected),
        )

    # --- plumbing ----------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Distinguishes several instances of one method in a checkpoint by the parameters they select."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def num_selected(self) -> int:
        if self._module is None:
            return 0
        params = dict(self._module.named_parameters())
        return sum(params[n].numel() for n in self.names)

    @property
    def mask_set(self) -> MaskSet:
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: it needs `trainer.fit` to call `setup` first.")
        return MaskSet.of(self._module)

    def params(self) -> dict[str, Tensor]:
        assert self._module is not None
        return dict(self._module.named_parameters())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        selected = self.select(pl_module)
        initial = self.initial_masks(selected)
        self._module, self.names, self.last_update_step = pl_module, list(selected), -1
        for name, param in selected.items():
            self.mask_set.add(name, param, initial.get(name))
        if self._pending_state is not None:
            self._load_now(self._pending_state)
            self._pending_state = None
        self.mask_set.apply_to_weights(self.params(), self.names)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        timeline = timeline_of(trainer)
        if self.planned_timeline is not None and tuple(self.planned_timeline) != astuple(timeline):
            self._warn_if_schedule_moves(Timeline(*self.planned_timeline), timeline)
        self.resolve_schedule(timeline)
        self.planned_timeline = list(astuple(timeline))
        params = self.params()
        self.mask_set.apply_to_weights(params, self.names)
        for optimizer in trainer.optimizers:  # state restored from a checkpoint (or a dense run) included
            self.mask_set.apply_to_optimizer_state(optimizer, params, self.names)
        self._check_ranks(params)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step != self.last_update_step and (self.deferred_update or self.is_update_step(step)):
            if self.scores_gradients and not self._gradients_finite():
                if not self.deferred_update:
                    rank_zero_warn(
                        f"{type(self).__name__}: the gradients at step {step} are not finite (a step AMP will skip); "
                        "the mask update waits for the next step with finite gradients."
                    )
                self.deferred_update = True
            else:
                self.deferred_update = False
                self.update_masks(trainer, pl_module, step)
        self.mask_set.apply_to_grads(self.params(), self.names)

    def _warn_if_schedule_moves(self, saved: Timeline, now: Timeline) -> None:
        """A run resumed with another length: fraction and epoch times resolve against the new one; say so."""
        self.resolve_schedule(saved)
        before = [e.step for e in self.events()]
        self.resolve_schedule(now)
        after = [e.step for e in self.events()]
        if before != after:
            moved = (
                f"its events move from steps {before[0]}..{before[-1]} to {after[0]}..{after[-1]}"
                if before and after
                else "its events change"
            )
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's run was {saved.total_steps:g} optimizer steps long "
                f"({saved.steps_per_epoch:g} an epoch), this one is {now.total_steps:g} ({now.steps_per_epoch:g}); "
                f"times given as fractions or epochs follow the new length, so {moved}."
            )

    def _gradients_finite(self) -> bool:
        params = self.params()
        grads = [params[n].grad for n in self.names if params[n].grad is not None]
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Compute new masks, check that ranks agree, and apply them to weights, gradients and optimizer state."""
        params = self.params()
        for name, mask in self.compute_masks(step, params).items():
            self.mask_set.update(name, mask)
        self._check_ranks(params)
        self.mask_set.apply_to_weights(params, self.names)
        for optimizer in trainer.optimizers:
            self.mask_set.apply_to_optimizer_state(optimizer, params, self.names)
        self.last_update_step = step

    def _check_ranks(self, params: Mapping[str, Tensor]) -> None:
        """What this rank computed (masks, and the selected weights, which OBS-style methods change) against the
        other ranks'; raises naming the method, the parameters and the ranks."""
        if not is_distributed():
            return
        owner = f"{type(self).__name__} at step {self._module.trainer.global_step if self._module else '?'}"
        check_ranks_agree(self.mask_set.fingerprints(self.names), "masks", owner)
        check_ranks_agree({n: fingerprint(params[n]) for n in self.names}, "weights", owner)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if type(optimizer) not in ZERO_PRESERVING_OPTIMIZERS:
            self.mask_set.apply_to_weights(self.params(), self.names)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.log_sparsity and sparsity_writer(trainer) is self:
            self._writer.write_step(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_sparsity and sparsity_writer(trainer) is self:
            self._writer.write_details(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {}
        return {"names": list(self.names), "masks": self.mask_set.state_dict(self.names), **self.states()}

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                f"The checkpoint's {type(self).__name__} masks parameters {state['names']}, but this callback selects "
                f"{self.names}. Use the same `include`/`exclude` as the run that saved it."
            )
        params = self.params()
        self.mask_set.load_state_dict(state["masks"], params)
        self.mask_set.apply_to_weights(params, self.names)
        self.load_states(state)


def mean_over_ranks(trainer: pl.Trainer, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` averaged over the DDP ranks in one collective (unchanged on a single process)."""
    if not is_distributed():
        return list(tensors)
    flat = trainer.strategy.reduce(torch.cat([t.flatten() for t in tensors]), reduce_op="mean")
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def training_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int, owner: str) -> Tensor:
    """The module's ``training_step`` loss on ``batch``, with ``self.log``/``self.log_dict`` silenced (a method
    that re-evaluates the loss outside Lightning's loop must not log, and can not under most hooks)."""
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        out = pl_module.training_step(batch, batch_idx)
    finally:
        del pl_module.log, pl_module.log_dict
    out = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(out, Tensor):
        raise ConfigError(f"{owner} needs `training_step` to return the loss (a tensor or {{'loss': ...}}).")
    return out


def skip_optimizer_step(trainer: pl.Trainer) -> None:
    """Make the coming optimizer step a no-op: every gradient of every optimizer is set to ``None``.

    Torch optimizers skip parameters without a gradient, so no weight, momentum or weight decay changes.
    """
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


def select_overrides(names: Sequence[str], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Map each selected name to its overridden sparsity; each override pattern must match a selected name."""
    result: dict[str, float] = {}
    for pattern, value in (overrides or {}).items():
        matched = [n for n in names if match_name(n, pattern)]
        if not matched:
            raise ConfigError(
                f"`overrides` pattern {pattern!r} matches no selected parameter. Selected: {list(names)}."
            )
        for n in matched:
            result.setdefault(n, value)
    return result


def check_pattern_fits(pattern: Pattern, params: Mapping[str, Tensor]) -> None:
    for name, p in params.items():
        pattern.check(name, p.shape)
