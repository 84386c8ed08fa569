"""The small base class that carries the plumbing, so each method file holds only its own mathematics.

A subclass says *which* masks (``initial_masks``, ``compute_masks``) and *when* (``is_update_step``); the base
selects the parameters, checks every argument before training, installs masks in the module's shared
:class:`~sparse_lightning.core.masks.MaskSet`, keeps masked weights at exactly zero through every optimizer step,
zeroes the optimizer state of pruned entries, keeps ranks identical under DDP, logs, and saves and restores its
state in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sparse_lightning.callbacks.monitor import log_sparsity, log_wandb_details, should_log
from sparse_lightning.core.errors import ConfigError, ConfigTypeError
from sparse_lightning.core.masks import MaskSet
from sparse_lightning.core.patterns import Pattern
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


class SparsityCallback(pl.Callback):
    """Base of every mask-producing callback.

    Args:
        include: parameter-name patterns to select (globs or ``re:`` regexes). Default: the ``weight`` of every
            Linear and ConvNd module.
        exclude: patterns removed from the selection.
        log_sparsity: log sparsity scalars (and, with a ``WandbLogger``, a per-layer table and histograms at each
            mask update) through the shared helper in :mod:`sparse_lightning.callbacks.monitor`.
    """

    SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        if not isinstance(log_sparsity, bool):
            raise ConfigTypeError(f"`log_sparsity` must be a bool, got {log_sparsity!r}.")
        self.log_sparsity = log_sparsity
        self.names: list[str] = []
        self.last_update_step = -1
        self._module: pl.LightningModule | None = None
        self._pending_state: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []

    # --- what a method provides --------------------------------------------------------------------------------

    @property
    def current_target(self) -> float | None:
        """The sparsity this callback is aiming at now (logged as ``sparsity/target``)."""
        return None

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Mapping[str, Tensor]) -> None:
        """Check the selected parameters before any mask is installed; raise ``ValueError`` on bad input."""

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        """Turn time arguments into optimizer steps once the number of training steps is known."""

    def initial_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masks installed at ``setup`` for the selected parameters that have none yet (missing: keep everything)."""
        return {}

    def is_update_step(self, step: int) -> bool:
        return False

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """New masks for ``self.names`` at optimizer step ``step``."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

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
        if not isinstance(trainer.strategy, self.SUPPORTED_STRATEGIES):
            raise ConfigError(
                f"{type(self).__name__} does not support the {type(trainer.strategy).__name__} strategy yet: masks "
                "would not reach the sharded parameters. Use a single device or `strategy='ddp'`."
            )
        names = select_parameters(pl_module, self.include, self.exclude)
        params = dict(pl_module.named_parameters())
        selected = {n: params[n] for n in names}
        self.validate(trainer, pl_module, selected)
        initial = self.initial_masks(selected)
        self._module, self.names, self.last_update_step = pl_module, names, -1
        for name in names:
            self.mask_set.add(name, params[name], initial.get(name))
        if self._pending_state is not None:
            self._load_now(self._pending_state)
        self.mask_set.apply_to_weights(params, names)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_schedule(trainer)
        params = self.params()
        self.mask_set.apply_to_weights(params, self.names)
        for optimizer in trainer.optimizers:  # state restored from a checkpoint (or a dense run) included
            self.mask_set.apply_to_optimizer_state(optimizer, params, self.names)
        self._sync_ranks()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step != self.last_update_step and self.is_update_step(step):
            self.update_masks(trainer, pl_module, step)
        self.mask_set.apply_to_grads(self.params(), self.names)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Compute new masks, make ranks agree, and apply them to weights, gradients and optimizer state."""
        params = self.params()
        new_masks = self.compute_masks(step, params)
        for name, mask in new_masks.items():
            self.mask_set.update(name, mask)
        self._sync_ranks()
        self.mask_set.apply_to_weights(params, self.names)
        for optimizer in trainer.optimizers:
            self.mask_set.apply_to_optimizer_state(optimizer, params, self.names)
        self.last_update_step = step
        if self.log_sparsity:
            log_wandb_details(trainer, pl_module, self.names)

    def _sync_ranks(self) -> None:
        self.mask_set.broadcast(self.names)
        self.mask_set.check_agreement(self.names)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if type(optimizer) not in ZERO_PRESERVING_OPTIMIZERS:
            self.mask_set.apply_to_weights(self.params(), self.names)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.log_sparsity and should_log(trainer):
            log_sparsity(trainer, pl_module, self.names, self.current_target)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_sparsity:
            log_wandb_details(trainer, pl_module, self.names)

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
        return {
            "names": list(self.names),
            "masks": self.mask_set.state_dict(self.names),
            "last_update_step": self.last_update_step,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._module is None:
            self._pending_state = dict(state_dict)
        else:
            self._load_now(state_dict)

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                f"The checkpoint's {type(self).__name__} masks parameters {state['names']}, but this callback selects "
                f"{self.names}. Use the same `include`/`exclude` as the run that saved it."
            )
        params = self.params()
        self.mask_set.load_state_dict(state["masks"], params)
        self.mask_set.apply_to_weights(params, self.names)
        self.last_update_step = int(state["last_update_step"])
        self.load_extra_state(state)
        self._pending_state = None


def skip_optimizer_step(trainer: pl.Trainer) -> None:
    """Make the coming optimizer step a no-op: every gradient of every optimizer is set to ``None``.

    Torch optimizers skip parameters without a gradient, so no weight, momentum or weight decay changes.
    """
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


def resolve_time(trainer: pl.Trainer, spec: TimeSpec, name: str) -> int:
    """An optimizer step for one time argument, from the trainer's estimate of the training length."""
    if spec.kind == "steps":
        return int(spec.value)
    total = trainer.estimated_stepping_batches
    if spec.kind == "fraction":
        if not math.isfinite(total):
            raise ConfigError(f"`{name}`={spec.text} is a fraction of training, but training has no fixed length.")
        return int(round(spec.value * total))
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ConfigError(f"`{name}`={spec.text!r} counts epochs, but the training dataloader has no length.")
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    return int(round(spec.value * steps_per_epoch))


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
